"""DNS block and allow lists (RFC 5782), postscreen-style: weighted, filtered, scored.

Every configured zone is asked in parallel under one deadline. A zone's answer
counts only if it passes the zone's return-code filter; answers that are not
listings at all (outside 127/8, or 127.255.255.252-255: the Spamhaus codes
for "you are querying through a public resolver", "over quota" and so on) are
errors: counted and logged once, never a listing. The weights of the matching
zones add up to a score; at or above the threshold the client is
`dnsbl.listed`. Negative weights make allow lists; a client with a negative
score, or in an allowed network, may skip other checks (the policy says which).
A zone that does not answer in time is `dnsbl.temperror` and counts as not
listed. Zones are health-checked (RFC 5782 5: 127.0.0.2 listed, 127.0.0.1 not)
and an unhealthy zone is skipped until it recovers.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, field_validator

from gateway import metrics
from gateway.config import Networks, Strict
from gateway.context import Context
from gateway.dns import DnsAnswer, DnsStatus, Resolver
from gateway.net import network_matcher, plain_ip
from gateway.vocab import Stage

log = logging.getLogger("gateway.dnsbl")

ERROR_CODES = frozenset(f"127.255.255.{n}" for n in range(252, 256))
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@functools.lru_cache(maxsize=4096)
def reverse_ip(ip: str) -> str:
    """1.2.3.4 -> 4.3.2.1; IPv6 -> reversed nibbles (RFC 5782 2.1 and 2.4). Cached:
    a client comes back, and parsing an address costs more than the lookup."""
    addr = ipaddress.ip_address(plain_ip(ip))
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


@dataclass
class ZoneState:
    cfg: DnsblZone
    healthy: bool = True
    warned_error: bool = False


def code_matches(code: str, filters: list[str]) -> bool:
    """Return-code filters: exact '127.0.0.2', CIDR '127.0.0.8/29', 'bitmask:0x04'."""
    if not filters:
        return True
    addr = ipaddress.ip_address(code)
    for f in filters:
        if f.startswith("bitmask:"):
            if int(addr) & int(f.split(":", 1)[1], 0):
                return True
        elif "/" in f:
            if addr in ipaddress.ip_network(f, strict=False):
                return True
        elif addr == ipaddress.ip_address(f):
            return True
    return False


# The stage at which each zone type is asked.
_STAGE_KIND = {Stage.CONNECT: "ip", Stage.HELO: "helo", Stage.MAIL: "mail_from"}


class DnsblZone(Strict):
    name: str  # in logs and metrics labels (never the zone, which may hold an access key)
    zone: str
    # ip: the client address (reversed); helo: the HELO name; mail_from: the sender domain.
    type: Literal["ip", "helo", "mail_from"] = "ip"
    weight: float = 1.0  # negative: an allow list
    # Return codes that count: "127.0.0.2", "127.0.0.8/29", "bitmask:0x04". Empty: any 127/8.
    codes: list[str] = Field(default_factory=list)
    # Shown in the reply instead of the zone and its TXT (hides paid-list access keys).
    reply_text: str | None = None
    use_txt: bool = True  # add the zone's TXT reason to the reply

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        import ipaddress

        for c in v:
            try:
                if c.startswith("bitmask:"):
                    int(c.split(":", 1)[1], 0)
                elif "/" in c:
                    ipaddress.ip_network(c, strict=False)
                else:
                    ipaddress.ip_address(c)
            except ValueError:
                raise ValueError(f"{c!r}: use an address, a CIDR range or bitmask:0xNN") from None
        return v


class DnsblOptions(Strict):
    enabled: bool = True
    zones: list[DnsblZone] = Field(default_factory=list)
    threshold: float = 1.0  # score at which a client is dnsbl.listed
    # Seconds for all zones of one stage together: the runner's time budget for
    # this check, in place of the policy's check_timeout.
    deadline: Annotated[float, Field(gt=0)] = 2.0
    allow_networks: Networks = Field(default_factory=list)  # treated as allow-listed
    health_interval: Annotated[float, Field(gt=0)] = 300.0  # RFC 5782 test-entry checks


class DnsblCheck:
    name: ClassVar[str] = "dnsbl"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT, Stage.HELO, Stage.MAIL})
    symbols: ClassVar[frozenset[str]] = frozenset(
        {"dnsbl.listed", "dnsbl.allowed", "dnsbl.temperror"}
    )
    reputation: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.zones: list[ZoneState] = []
        # The zones of the latest configuration, shared by every configured copy:
        # what the health checks test and a new configuration inherits health from.
        self._latest: list[list[ZoneState]] = [self.zones]
        self.has_allow = False
        self.threshold = 1.0
        self.budget: float | None = DnsblOptions().deadline
        self.allowed_network: Callable[[str], bool] = network_matcher([])

    def configured(self, options: DnsblOptions) -> Self:
        """This check under `options`: a new object; a zone kept from the current
        configuration keeps its health."""
        old = {z.cfg.name: z for z in self._latest[0]}
        zones = []
        for cfg in options.zones:
            prev = old.get(cfg.name)
            if prev is not None and prev.cfg == cfg:
                zones.append(prev)
            else:
                zones.append(ZoneState(cfg, prev.healthy if prev is not None else True))
        new = copy.copy(self)
        new.zones = zones
        self._latest[0] = zones
        new.threshold = options.threshold
        new.budget = options.deadline
        new.allowed_network = network_matcher(options.allow_networks)
        new.has_allow = bool(options.allow_networks)
        for z in zones:
            metrics.child(metrics.DNSBL_ZONE_HEALTHY, z.cfg.name).set(1 if z.healthy else 0)
        return new

    def active_stages(self) -> set[Stage]:
        kinds = {z.cfg.type for z in self.zones}
        out = {s for s, k in _STAGE_KIND.items() if k in kinds}
        if self.has_allow:
            out.add(Stage.CONNECT)
        return out

    # -- per message -------------------------------------------------------------
    def _queries(self, stage: Stage, ctx: Context) -> list[tuple[ZoneState, str]]:
        out = []
        for z in self.zones:
            if not z.healthy:
                continue
            kind = z.cfg.type
            if stage is Stage.CONNECT and kind == "ip":
                out.append((z, f"{reverse_ip(ctx.client_ip)}.{z.cfg.zone}"))
            elif stage is Stage.HELO and kind == "helo" and ctx.helo and "." in ctx.helo:
                out.append((z, f"{ctx.helo.strip('[]').lower()}.{z.cfg.zone}"))
            elif (
                stage is Stage.MAIL
                and kind == "mail_from"
                and ctx.mail_from is not None
                and ctx.mail_from.domain
            ):
                out.append((z, f"{ctx.mail_from.domain}.{z.cfg.zone}"))
        return out

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        """Synchronous when every answer it needs is in the DNS cache (a returning client)."""
        if stage is Stage.CONNECT and self.allowed_network(ctx.client_ip):
            ctx.allowlisted = True
            return ("dnsbl.allowed",)
        queries = self._queries(stage, ctx)
        if not queries:
            return ()
        known = [self.resolver.cached(name, "A") for _z, name in queries]
        if any(a is None for a in known):
            return self._run_async(stage, ctx, queries, known, [])
        results: list[tuple[str, str]] = []
        for (z, name), ans in zip(queries, known, strict=True):
            assert ans is not None
            status, reason, label = self._classify(z, ans)
            if self._wants_txt(z, status):
                txt = self.resolver.cached(name, "TXT")
                if txt is None:  # the listing's reason is not cached (yet)
                    return self._run_async(stage, ctx, queries, known, results)
                reason = _reason(txt)
            metrics.child(metrics.DNSBL_LOOKUPS, z.cfg.name, label).inc()
            results.append((status, reason))
        return self._score(stage, ctx, queries, results)

    async def _run_async(
        self,
        stage: Stage,
        ctx: Context,
        queries: list[tuple[ZoneState, str]],
        known: list[DnsAnswer | None],
        done: list[tuple[str, str]],
    ) -> tuple[str, ...]:
        """Finish what the cache could not: `done` holds the results of the first
        zones, judged and counted already; the rest are looked up, each from the A
        answer the cache gave (`known`) when it gave one, so nothing is asked twice."""
        n = len(done)
        rest = await asyncio.gather(
            *(
                self._lookup(z, name, ctx.deadline, a)
                for (z, name), a in zip(queries[n:], known[n:], strict=True)
            )
        )
        return self._score(stage, ctx, queries, [*done, *rest])

    def _score(
        self,
        stage: Stage,
        ctx: Context,
        queries: list[tuple[ZoneState, str]],
        results: list[tuple[str, str]],
    ) -> tuple[str, ...]:
        symbols: list[str] = []
        stage_score = 0.0
        for (z, _name), (status, reason) in zip(queries, results, strict=True):
            if status == "listed":
                stage_score += z.cfg.weight
                ctx.dnsbl_hits.append(z.cfg.name)
                if z.cfg.weight > 0 and "dnsbl.listed" not in ctx.details:
                    text = z.cfg.reply_text or f"{z.cfg.zone}"
                    if reason and not z.cfg.reply_text:
                        text += f": {reason}"
                    ctx.details["dnsbl.listed"] = text
            elif status in ("timeout", "error") and "dnsbl.temperror" not in symbols:
                symbols.append("dnsbl.temperror")
        # The client's own listings (address, HELO) hold for the session; a sender
        # domain's only for its transaction.
        score = ctx.dnsbl_score + stage_score
        if stage is not Stage.MAIL:
            ctx.dnsbl_score = score
        if score >= self.threshold:
            symbols.insert(0, "dnsbl.listed")
        elif score < 0:
            ctx.allowlisted = True
            symbols.insert(0, "dnsbl.allowed")
        return tuple(symbols)

    @staticmethod
    def _wants_txt(z: ZoneState, status: str) -> bool:
        return status == "listed" and z.cfg.use_txt and not z.cfg.reply_text

    async def _lookup(
        self, z: ZoneState, name: str, deadline: float, ans: DnsAnswer | None = None
    ) -> tuple[str, str]:
        """('listed', reason) | ('clean', '') | ('timeout', '') | ('error', why), by
        the runner's deadline for every zone together: an unanswered zone is a
        temperror, a listing whose TXT reason is late is a listing without one.
        `ans`: the A answer when the cache already gave it."""
        if ans is None:
            try:
                async with asyncio.timeout_at(deadline):
                    ans = await self.resolver.query(name, "A")
            except TimeoutError:
                metrics.child(metrics.DNSBL_LOOKUPS, z.cfg.name, "timeout").inc()
                return "timeout", ""
        status, reason, label = self._classify(z, ans)
        metrics.child(metrics.DNSBL_LOOKUPS, z.cfg.name, label).inc()
        if self._wants_txt(z, status):
            try:
                async with asyncio.timeout_at(deadline):
                    reason = _reason(await self.resolver.query(name, "TXT"))
            except TimeoutError:
                reason = ""
        return status, reason

    def _classify(self, z: ZoneState, ans: DnsAnswer) -> tuple[str, str, str]:
        """(status, reason, lookup-metric result) of an A answer for zone z. Counts
        nothing: the caller counts once it knows which path answers."""
        if ans.temporary:
            return "timeout", "", ans.status.value
        if ans.status is not DnsStatus.OK:
            return "clean", "", "clean"
        codes = [str(c) for c in ans.records]
        bad = [c for c in codes if c in ERROR_CODES or ipaddress.ip_address(c) not in LOOPBACK]
        if bad:
            if not z.warned_error:
                z.warned_error = True
                log.warning(
                    "DNSBL %s answered %s: an error code, not a listing (public "
                    "resolver, quota or access key?); logged once",
                    z.cfg.name,
                    bad,
                )
            return "error", ",".join(bad), "error"
        if not any(code_matches(c, z.cfg.codes) for c in codes):
            return "clean", "", "clean"
        return "listed", "", "listed"

    # -- health ---------------------------------------------------------------------
    async def health_check(self) -> dict[str, bool]:
        """RFC 5782 5: the test entries. IP zones only (domain zones have no standard one)."""
        out = {}
        for z in self._latest[0]:
            if z.cfg.type != "ip":
                continue
            listed = await self.resolver.query(f"2.0.0.127.{z.cfg.zone}", "A")
            clean = await self.resolver.query(f"1.0.0.127.{z.cfg.zone}", "A")
            healthy = (
                listed.status is DnsStatus.OK
                and bool(listed.records)
                and not any(str(c) in ERROR_CODES for c in listed.records)
                and clean.status in (DnsStatus.NXDOMAIN, DnsStatus.NODATA)
            )
            if healthy != z.healthy:
                log.warning(
                    "DNSBL %s is now %s", z.cfg.name, "healthy" if healthy else "unhealthy: skipped"
                )
            z.healthy = healthy
            metrics.child(metrics.DNSBL_ZONE_HEALTHY, z.cfg.name).set(1 if healthy else 0)
            out[z.cfg.name] = healthy
        return out

    async def health_loop(self, interval: float) -> None:
        while True:
            try:
                await self.health_check()
            except Exception:
                log.exception("DNSBL health check failed")
            await asyncio.sleep(interval)

    def health(self) -> dict[str, bool]:
        return {z.cfg.name: z.healthy for z in self._latest[0]}


def _reason(txt: DnsAnswer) -> str:
    """A listing's TXT record as reply text (RFC 5782 2.1), bounded."""
    if txt.status is DnsStatus.OK and txt.records:
        return b"".join(txt.records[0]).decode("utf-8", "replace")[:200]
    return ""
