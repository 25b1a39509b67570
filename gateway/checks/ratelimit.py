"""Rate and concurrency limits declared in the policy.

Each limit counts one unit (connections at CONNECT, messages at MAIL,
recipients at RCPT, bytes at DATA) under a key built from the transaction
(client address or network, sender, sender domain, recipient, recipient
domain, or combinations), with GCRA: `rate` per period plus `burst`.
Concurrency limits hold a slot per open connection and free it when the
connection ends, however it ends.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from gateway import metrics
from gateway.checks.base import Symbols
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


class RateLimitCheck:
    name: ClassVar[str] = "ratelimit"
    stages: ClassVar[frozenset[Stage]] = frozenset(UNIT_STAGE.values())
    symbols: ClassVar[frozenset[str]] = frozenset(
        {"ratelimit.exceeded", "ratelimit.concurrency", "ratelimit.unavailable"}
    )
    reputation: ClassVar[bool] = True

    def __init__(self, store: Store | None = None) -> None:
        self.store: Store = store or MemoryStore()
        self.limits: list[_Limit] = []
        self.concurrency: list[_Concurrency] = []

    def configure(self, options: Any) -> None:
        self.limits = []
        for lim in options.limits:
            count, period = parse_rate(lim.rate)
            self.limits.append(
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
        self.concurrency = [
            _Concurrency(c.name, c.key, c.max, _matcher(c.exempt_networks))
            for c in options.concurrency
        ]

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
