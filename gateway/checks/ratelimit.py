"""Rate and concurrency limits declared in the policy.

Each limit counts one unit (connections at CONNECT, messages at MAIL,
recipients at RCPT, bytes at DATA) under a key built from the transaction
(client address or network, sender, sender domain, recipient, recipient
domain, or combinations), with GCRA: `rate` per period plus `burst`.
Concurrency limits hold a slot per open connection and free it when the
connection ends, however it ends.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, field_validator

from gateway import metrics
from gateway.checks.base import Symbols
from gateway.config import Networks, Strict
from gateway.context import Context
from gateway.net import IPNetwork, network_matcher, network_of
from gateway.store.base import CONC, RATE, GcraOp, StoreError
from gateway.store.memory import MemoryStore
from gateway.vocab import Stage

if TYPE_CHECKING:
    from gateway.store import Store
    from gateway.store.redis import RedisStore

UNIT_STAGE = {
    "connections": Stage.CONNECT,
    "messages": Stage.MAIL,
    "recipients": Stage.RCPT,
    "bytes": Stage.DATA,
}
PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def parse_rate(rate: str) -> tuple[int, float]:
    """'100/minute' -> (100, 60.0); also '5/10s'."""
    count, _, per = rate.partition("/")
    per = per.strip().lower()
    if per.endswith("s") and per[:-1].replace(".", "", 1).isdigit():
        period = float(per[:-1])
    else:
        period = PERIODS[per.rstrip("s") if per.rstrip("s") in PERIODS else per]
    n = int(count)
    if n <= 0 or period <= 0:
        raise ValueError(rate)
    return n, period


def key_parts(kind: str, ctx: Context) -> str | None:
    """One component of a limit key; None when the transaction has no such part."""
    if kind == "client_ip":
        return ctx.client_ip
    if kind == "client_network":
        return network_of(ctx.client_ip)
    if kind == "mail_from":
        return str(ctx.mail_from).lower() if ctx.mail_from is not None else None
    if kind == "mail_from_domain":
        return ctx.mail_from.domain if ctx.mail_from is not None else None
    if kind == "recipient":
        return str(ctx.rcpt).lower() if ctx.rcpt is not None else None
    if kind == "recipient_domain":
        return ctx.rcpt.domain if ctx.rcpt is not None else None
    raise ValueError(kind)


@dataclass(frozen=True, slots=True)
class _Limit:
    """A configured limit, parsed once at (re)load instead of per message."""

    name: str
    stage: Stage
    parts: tuple[str, ...]
    count: int
    period: float
    burst: int
    bytes: bool
    exempt: Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class _Concurrency:
    name: str
    part: str
    max: int
    exempt: Callable[[str], bool]


def _never(_ip: str) -> bool:
    return False


def _matcher(networks: list[IPNetwork]) -> Callable[[str], bool]:
    return network_matcher(networks) if networks else _never


_KEY_PARTS = {
    "client_ip",
    "client_network",
    "mail_from",
    "mail_from_domain",
    "recipient",
    "recipient_domain",
}


# Limit names appear in metric labels and in operators' keys (`NAME:VALUE`).
LimitName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class RateLimit(Strict):
    name: LimitName  # in logs and metrics labels
    # Parts joined with '+': client_ip, client_network (/24, /64), mail_from,
    # mail_from_domain, recipient, recipient_domain.
    key: str = "client_ip"
    unit: Literal["connections", "messages", "recipients", "bytes"] = "messages"
    # N per period: up to N at once, refilled continuously (N/second|minute|hour|day,
    # or N/<seconds>s); burst: extra units allowed at once on top of N.
    rate: str = "100/minute"
    burst: Annotated[int, Field(ge=0)] = 0
    exempt_networks: Networks = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        bad = [p for p in v.split("+") if p not in _KEY_PARTS]
        if bad:
            raise ValueError(f"unknown key part {bad[0]!r} (use {', '.join(sorted(_KEY_PARTS))})")
        return v

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str) -> str:
        try:
            parse_rate(v)
        except (ValueError, KeyError):
            raise ValueError(f"{v!r}: use N/second, N/minute, N/hour, N/day or N/10s") from None
        return v


class Concurrency(Strict):
    name: LimitName
    key: Literal["client_ip", "client_network"] = "client_ip"
    max: Annotated[int, Field(ge=1)] = 20
    exempt_networks: Networks = Field(default_factory=list)


def _default_concurrency() -> list[Concurrency]:
    """Sessions at once per client address and per /24 (/64): well below a
    listener's max_connections (1000), so no one client, nor one network, can hold
    every slot (Postfix's smtpd_client_connection_count_limit is 50)."""
    return [
        Concurrency(name="conns_per_ip", key="client_ip", max=50),
        Concurrency(name="conns_per_network", key="client_network", max=150),
    ]


class RateLimitOptions(Strict):
    enabled: bool = True
    limits: list[RateLimit] = Field(default_factory=list)
    concurrency: list[Concurrency] = Field(default_factory=_default_concurrency)

    def model_post_init(self, _ctx: Any) -> None:
        names = [x.name for x in self.limits] + [x.name for x in self.concurrency]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"limit name {dup!r} is used twice")


class RateLimitCheck:
    name: ClassVar[str] = "ratelimit"
    stages: ClassVar[frozenset[Stage]] = frozenset(UNIT_STAGE.values())
    symbols: ClassVar[frozenset[str]] = frozenset(
        {"ratelimit.exceeded", "ratelimit.concurrency", "ratelimit.unavailable"}
    )
    reputation: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset()
    budget: float | None = None

    def __init__(self, store: Store | None = None) -> None:
        self.store: Store = store or MemoryStore()
        self.limits: list[_Limit] = []
        self.concurrency: list[_Concurrency] = []

    def configured(self, options: RateLimitOptions) -> Self:
        """This check under `options`: a new object counting in the same store."""
        new = copy.copy(self)
        new.limits = []
        for lim in options.limits:
            count, period = parse_rate(lim.rate)
            new.limits.append(
                _Limit(
                    lim.name,
                    UNIT_STAGE[lim.unit],
                    tuple(lim.key.split("+")),
                    count,
                    period,
                    lim.burst,
                    lim.unit == "bytes",
                    _matcher(lim.exempt_networks),
                )
            )
            metrics.child(metrics.RATELIMIT_CONFIGURED, lim.name).set(count / period)
        new.concurrency = [
            _Concurrency(c.name, c.key, c.max, _matcher(c.exempt_networks))
            for c in options.concurrency
        ]
        return new

    def active_stages(self) -> set[Stage]:
        out = {lim.stage for lim in self.limits}
        if self.concurrency:
            out.add(Stage.CONNECT)
        return out

    def _plan(
        self, stage: Stage, ctx: Context
    ) -> tuple[list[tuple[str, _Concurrency]], list[GcraOp], list[str]]:
        """The slots to take and the limits to charge at this stage, as store keys."""
        slots = []
        if stage is Stage.CONNECT:
            for c in self.concurrency:
                if not c.exempt(ctx.client_ip):
                    slots.append((f"{CONC}:{c.name}:{key_parts(c.part, ctx)}", c))
        ops, names = [], []
        for lim in self.limits:
            if lim.stage is not stage or lim.exempt(ctx.client_ip):
                continue
            parts = [key_parts(k, ctx) for k in lim.parts]
            if any(p is None for p in parts):
                continue
            cost = len(ctx.wire or b"") if lim.bytes else 1
            key = f"{RATE}:{lim.name}:{'|'.join(str(p) for p in parts)}"
            ops.append(GcraOp(key, lim.period, lim.count, lim.burst, cost))
            names.append(lim.name)
        return slots, ops, names

    def run(self, stage: Stage, ctx: Context) -> Symbols | Awaitable[Symbols]:
        slots, ops, names = self._plan(stage, ctx)
        if not slots and not ops:
            return ()
        store = self.store
        if not isinstance(store, MemoryStore):
            return self._run_shared(store, ctx, slots, ops, names)
        for key, c in slots:
            if not store.acquire(key, c.max):
                return _refused(ctx, "ratelimit.concurrency", c.name)
            ctx.on_close.append(functools.partial(store.release, key))
        refused = store.take(ops) if ops else -1
        return _refused(ctx, "ratelimit.exceeded", names[refused]) if refused >= 0 else ()

    async def _run_shared(
        self,
        store: RedisStore,
        ctx: Context,
        slots: list[tuple[str, _Concurrency]],
        ops: list[GcraOp],
        names: list[str],
    ) -> Symbols:
        """The same decisions as the in-memory path, one Redis script each; a store
        failure becomes `ratelimit.unavailable` (the policy: allow, or tempfail)."""
        try:
            for key, c in slots:
                if not await store.acquire(key, c.max):
                    return _refused(ctx, "ratelimit.concurrency", c.name)
                ctx.on_close.append(functools.partial(store.release, key))
            refused = await store.take(ops) if ops else -1
        except StoreError:
            return ("ratelimit.unavailable",)
        return _refused(ctx, "ratelimit.exceeded", names[refused]) if refused >= 0 else ()


def _refused(ctx: Context, symbol: str, limit: str) -> Symbols:
    metrics.child(metrics.RATELIMIT_HITS, limit).inc()
    ctx.details[symbol] = limit
    return (symbol,)
