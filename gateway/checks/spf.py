"""SPF (RFC 7208) with pyspf, for MAIL FROM, or HELO when MAIL FROM is null.

pyspf is synchronous and does its own DNS. We replace its DNS function with
one that reads our resolver's cache directly and, on a miss, asks the
resolver on the event loop and waits in the worker thread; pyspf itself runs
in a small bounded thread pool. The loop never blocks, every lookup goes
through the one cache, and the 10-lookup and 2-void-lookup limits stay
pyspf's (tested against the RFC 7208 suite).

Chosen over pre-fetching because SPF's lookups depend on each other's
answers; chosen over a thread per query because a warm cache makes the whole
evaluation a cheap in-thread computation. On repeat senders even that is
skipped: verdicts are cached per (client IP, identity) for a short time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from typing import Any, ClassVar

import spf

from gateway.checks.base import OffLoopCheck
from gateway.dns import Resolver
from gateway.pipeline.results import AuthResult
from gateway.pipeline.stage import Context, Stage

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

_tls = threading.local()


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup contract: [((name, qtype), value), ...]; TempError on failure."""
    resolver: Resolver = _tls.resolver
    ans = resolver.query_from_thread(name, qtype, _tls.loop, timeout)
    if ans.temporary:
        raise spf.TempError(f"DNS {ans.status.value} for {name}/{qtype}")
    return [((name, qtype), v) for v in ans.records]


spf.DNSLookup = _lookup


def _key(ip: str, identity: str, helo: str) -> tuple[str, str, str]:
    """The verdict cache's key: domains and local parts compared without case."""
    return (ip, identity.lower(), helo.lower())


class SpfCheck(OffLoopCheck):
    name: ClassVar[str] = "spf"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL})
    symbols: ClassVar[frozenset[str]] = frozenset(f"spf.{r}" for r in RESULTS)
    reputation: ClassVar[bool] = True

    def __init__(self, resolver: Resolver, *, threads: int = 8) -> None:
        super().__init__(resolver, threads=threads, name="spf")
        self.timeout = 10.0
        self.cache_ttl = 60.0
        self._cache: dict[tuple[str, str, str], tuple[float, str, str]] = {}

    def configure(self, options: Any) -> None:
        self.timeout = options.timeout
        self.cache_ttl = options.result_cache_ttl

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        """Synchronous for a repeat sender whose verdict is cached: no task, no timer."""
        helo = ctx.helo or ""
        sender = ctx.mail_from
        if sender is None:
            return ()
        if sender.is_null:
            scope, identity = "helo", f"postmaster@{helo}"
            domain = helo
        else:
            scope, identity = "mailfrom", str(sender)
            domain = sender.domain
        hit = self._cached(_key(ctx.client_ip, identity, helo))
        if hit is not None:
            return self._record(ctx, scope, domain, helo, hit)
        return self._run_async(ctx, scope, domain, identity, helo)

    async def _run_async(
        self, ctx: Context, scope: str, domain: str, identity: str, helo: str
    ) -> tuple[str, ...]:
        verdict = await self.evaluate(ctx.client_ip, identity, helo)
        return self._record(ctx, scope, domain, helo, verdict)

    @staticmethod
    def _record(
        ctx: Context, scope: str, domain: str, helo: str, verdict: tuple[str, str]
    ) -> tuple[str, ...]:
        result, why = verdict
        prop = {"smtp.mailfrom": domain} if scope == "mailfrom" else {"smtp.helo": helo}
        ctx.auth.append(AuthResult("spf", result, prop, why))
        ctx.spf_domain = domain
        ctx.spf_result = result
        return (f"spf.{result}",)

    def _cached(self, key: tuple[str, str, str]) -> tuple[str, str] | None:
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1], hit[2]
        return None

    async def evaluate(self, ip: str, identity: str, helo: str) -> tuple[str, str]:
        """(result, explanation) for one identity; the entry point the RFC suite tests."""
        domain = (identity.rpartition("@")[2] or helo).rstrip(".")  # pyspf's choice too
        if domain and "." not in domain:
            # RFC 7208 4.3: a domain that is not multi-label is "none" at once (a TLD's
            # record is not the sender's); pyspf would look it up and evaluate it.
            return "none", "not a multi-label domain"
        key = _key(ip, identity, helo)
        hit = self._cached(key)
        if hit is not None:
            return hit
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        result, why = await loop.run_in_executor(self.pool, self._check, ip, identity, helo, loop)
        if result != "temperror" and self.cache_ttl > 0:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key] = (now + self.cache_ttl, result, why)
        return result, why

    def _check(
        self, ip: str, identity: str, helo: str, loop: asyncio.AbstractEventLoop
    ) -> tuple[str, str]:
        _tls.resolver = self.resolver
        _tls.loop = loop
        try:
            q = spf.query(i=ip, s=identity, h=helo, querytime=self.timeout)
            result, _code, why = q.check()
        except Exception as e:  # pyspf raises on malformed input it did not expect
            return "permerror", f"SPF evaluation failed: {e}"
        return str(result), str(why)
