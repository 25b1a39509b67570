"""One async resolver for every check: cache within TTL, deadline, metrics.

Timeout and SERVFAIL are never confused with NXDOMAIN: a check that sees
`temporary` must report a temperror, and the policy decides (DNS failure is
never a pass). Answers are cached per (name, type) for their TTL, negative
answers for the SOA minimum (bounded), failures not at all. Concurrent asks
for the same key share one query.

The cache is used on the loop only: a check that does its work in a worker thread
(DKIM or ARC on a large message) fetches what it needs first and takes the answers along.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway import config, metrics
from gateway.config import parse_nameserver

log = logging.getLogger("gateway.dns")


def ascii_name(name: str) -> str:
    """A domain as the DNS holds it: U-labels converted to A-labels (RFC 5890), by the
    codec the resolver itself uses, so that names compared for DMARC alignment are
    the ones looked up. One that cannot be converted is returned unchanged; looking
    it up then gives NXDOMAIN (see `_ask`)."""
    if name.isascii():
        return name
    try:
        return dns.name.from_unicode(name).to_text(omit_final_dot=True)
    except dns.exception.DNSException:
        return name


class DnsStatus(StrEnum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    SERVFAIL = "servfail"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """Records in simple form: A/AAAA and names as text, TXT as a tuple of byte
    strings (one per character-string), MX as (preference, exchange)."""

    status: DnsStatus
    records: tuple[Any, ...] = ()
    ttl: float = 0.0

    @property
    def temporary(self) -> bool:
        return self.status in (DnsStatus.SERVFAIL, DnsStatus.TIMEOUT)

    @property
    def exists(self) -> bool:
        return self.status is not DnsStatus.NXDOMAIN and not self.temporary


def _simple(rdtype: str, rdata: Any) -> Any:
    if rdtype in ("A", "AAAA"):
        return rdata.address
    if rdtype in ("TXT", "SPF"):
        return tuple(rdata.strings)
    if rdtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
    if rdtype in ("PTR", "CNAME", "NS"):
        return rdata.target.to_text(omit_final_dot=True)
    return rdata.to_text()


def _count_hit() -> None:
    metrics.child(metrics.DNS_CACHE, "hit").inc()


class Health:
    """Whether the resolver has been failing lately: most of the queries of the last
    minute timed out or got SERVFAIL. Every check then says temperror and the
    policy defers mail, so the operator must hear of it: a warning (at most one a
    minute while it lasts, and a line when it ends) and the figures in
    /healthz/ready's body. It never makes the gateway unready: another replica's
    resolver is likely the same, and a 451 is the right answer meanwhile."""

    WINDOW = 60.0  # seconds of queries judged
    SLOTS = 6  # the window in slots of WINDOW / SLOTS seconds
    MIN_QUERIES = 10  # fewer in the window: too few to judge
    WARN_EVERY = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._slots: deque[list[float]] = deque()  # [start, queries, failed]
        self._warned_at: float | None = None
        self.failing = False

    def record(self, failed: bool) -> None:
        now = self.clock()
        slots = self._slots
        width = self.WINDOW / self.SLOTS
        if not slots or now - slots[-1][0] >= width:
            slots.append([now, 0, 0])
        last = slots[-1]
        last[1] += 1
        last[2] += failed
        self._judge(now)

    def _judge(self, now: float) -> None:
        slots = self._slots
        while slots and now - slots[0][0] >= self.WINDOW:
            slots.popleft()
        queries = sum(s[1] for s in slots)
        failed = sum(s[2] for s in slots)
        # Failing past half the queries; failing no more under a quarter: near the
        # line, the verdict would change with every query, and say so each time.
        if self.failing:
            failing = queries >= self.MIN_QUERIES and failed * 4 >= queries
        else:
            failing = queries >= self.MIN_QUERIES and failed * 2 > queries
        if failing and (self._warned_at is None or now - self._warned_at >= self.WARN_EVERY):
            self._warned_at = now
            log.warning(
                "DNS resolver failing: %d of %d queries in the last %d s timed out or got "
                "SERVFAIL; checks answer temperror and the policy decides (default: defer)",
                failed, queries, self.WINDOW,
            )  # fmt: skip
        elif self.failing and not failing:
            self._warned_at = None
            log.warning("DNS resolver answering again: %d of %d queries failed", failed, queries)
        self.failing = failing

    def state(self) -> dict[str, object]:
        """For /healthz/ready's body."""
        self._judge(self.clock())
        return {
            "failing": self.failing,
            "queries": int(sum(s[1] for s in self._slots)),
            "failed": int(sum(s[2] for s in self._slots)),
            "window_seconds": self.WINDOW,
        }


class Resolver:
    def __init__(self, cfg: config.Dns) -> None:
        self.cfg = cfg
        r = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
        if cfg.nameservers:
            r.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in (parse_nameserver(s) for s in cfg.nameservers)
            ]
        r.timeout = cfg.timeout
        r.lifetime = cfg.timeout
        r.cache = None  # ours below: bounded, negative-aware, readable from threads
        self._r = r
        self._cache: dict[tuple[str, str], tuple[float, DnsAnswer]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[DnsAnswer]] = {}
        self.health = Health()

    @staticmethod
    def _key(name: str, rdtype: str) -> tuple[str, str]:
        return (name.lower().rstrip("."), rdtype.upper())

    def peek(self, name: str, rdtype: str) -> DnsAnswer | None:
        """A cached, unexpired answer, or None; not counted (see `cached`)."""
        hit = self._cache.get(self._key(name, rdtype))
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def cached(self, name: str, rdtype: str) -> DnsAnswer | None:
        """On the loop: `peek`, counted as a cache hit when it answers (a check
        that found its answer here never calls `query`, which counts the rest)."""
        ans = self.peek(name, rdtype)
        if ans is not None:
            _count_hit()
        return ans

    def _store(self, key: tuple[str, str], ans: DnsAnswer) -> None:
        if ans.temporary or ans.ttl <= 0:
            return
        cache = self._cache
        if len(cache) >= self.cfg.cache_size:
            # Insertion order: drop the oldest tenth in one go, cheaply.
            for k in list(cache)[: max(1, len(cache) // 10)]:
                del cache[k]
        cache[key] = (time.monotonic() + ans.ttl, ans)

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        key = self._key(name, rdtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0] >= time.monotonic():
            _count_hit()
            return hit[1]
        metrics.child(metrics.DNS_CACHE, "miss").inc()
        task = self._inflight.get(key)
        if task is None:
            # Its own task, awaited through shield(): one asker's deadline (a
            # cancellation) must never reach the other sessions sharing the query.
            task = asyncio.get_running_loop().create_task(self._ask_and_store(key))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task)

    def _done(self, key: tuple[str, str], _task: asyncio.Task[DnsAnswer]) -> None:
        self._inflight.pop(key, None)

    async def _ask_and_store(self, key: tuple[str, str]) -> DnsAnswer:
        ans = await self._ask(*key)
        self._store(key, ans)
        return ans

    async def _ask(self, name: str, rdtype: str) -> DnsAnswer:
        start = time.perf_counter()
        status = DnsStatus.OK
        try:
            answer = await self._r.resolve(name, rdtype, raise_on_no_answer=False, search=False)
            if answer.rrset is None:
                status = DnsStatus.NODATA
                result = DnsAnswer(status, (), self._negative_ttl(answer.response))
            else:
                ttl = min(float(answer.rrset.ttl), self.cfg.max_ttl)
                result = DnsAnswer(status, tuple(_simple(rdtype, rd) for rd in answer.rrset), ttl)
        except dns.resolver.NXDOMAIN as e:
            status = DnsStatus.NXDOMAIN
            responses = e.responses()  # type: ignore[no-untyped-call]
            resp = responses.get(dns.name.from_text(name)) if responses else None
            result = DnsAnswer(status, (), self._negative_ttl(resp))
        except (dns.exception.SyntaxError, dns.name.NameTooLong, dns.name.IDNAException):
            # Not a name the DNS can hold (an empty or 64-octet label, 256 octets in
            # all): no such name exists, for good. As SERVFAIL (below) it would be a
            # temporary error, and a message naming one deferred until it expires.
            status = DnsStatus.NXDOMAIN
            result = DnsAnswer(status, (), self.cfg.negative_ttl)
        except (dns.resolver.NoNameservers, dns.resolver.YXDOMAIN, dns.resolver.NoRootSOA):
            status = DnsStatus.SERVFAIL
            result = DnsAnswer(status)
        except dns.exception.Timeout:
            status = DnsStatus.TIMEOUT
            result = DnsAnswer(status)
        except dns.exception.DNSException:
            status = DnsStatus.SERVFAIL
            result = DnsAnswer(status)
        metrics.child(metrics.DNS_QUERIES, rdtype, status.value).inc()
        self.health.record(status is DnsStatus.TIMEOUT or status is DnsStatus.SERVFAIL)
        metrics.child(metrics.DNS_LATENCY, rdtype).observe(time.perf_counter() - start)
        return result

    def _negative_ttl(self, response: dns.message.Message | None) -> float:
        """RFC 2308: the SOA minimum, bounded by our configured negative TTL."""
        ttl = self.cfg.negative_ttl
        if response is not None:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    ttl = min(ttl, float(rrset.ttl), float(rrset[0].minimum))
        return ttl
