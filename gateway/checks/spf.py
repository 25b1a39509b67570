"""SPF (RFC 7208) with pyspf, for MAIL FROM, or HELO when MAIL FROM is null.

pyspf is synchronous and does its own DNS. We replace its DNS function with
one that reads our resolver's cache directly and, on a miss, asks the
resolver on the event loop and waits in the worker thread; pyspf itself runs
in a small bounded thread pool. The loop never blocks, every lookup goes
through the one cache, and the 10-lookup and 2-void-lookup limits stay
pyspf's (tested against the RFC 7208 suite).

Chosen over pre-fetching because SPF's lookups depend on each other's
answers. With a warm cache the evaluation is a cheap computation, cheaper than
the thread hop itself (about 140 µs of CPU on a two-core VM, against 160 for a
typical evaluation), so it is first tried on the loop with the cache alone, and
goes to the thread, from the start, only at an answer the cache lacks. On repeat
senders even that is skipped: verdicts are cached per (client IP, identity) for a
short time.
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


class _NotCached(Exception):
    """An evaluation on the loop needs an answer the cache does not hold."""


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup contract: [((name, qtype), value), ...]; TempError on failure."""
    resolver: Resolver = _tls.resolver
    loop: asyncio.AbstractEventLoop | None = _tls.loop
    if loop is None:  # on the loop itself: the cache or nothing
        cached = resolver.cached(name, qtype)
        if cached is None:
            # Noted as well as raised: pyspf swallows every exception around the
            # exp= lookup, and an evaluation that missed anything is not used.
            _tls.missed = True
            raise _NotCached(name)
        ans = cached
    else:
        ans = resolver.query_from_thread(name, qtype, loop, timeout)
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
        verdict = self._quick(ctx.client_ip, identity, helo)
        if verdict is not None:
            return self._record(ctx, scope, domain, helo, verdict)
        return self._run_async(ctx, scope, domain, identity, helo)

    async def _run_async(
        self, ctx: Context, scope: str, domain: str, identity: str, helo: str
    ) -> tuple[str, ...]:
        verdict = await self._in_thread(ctx.client_ip, identity, helo)
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
        verdict = self._quick(ip, identity, helo)
        return verdict if verdict is not None else await self._in_thread(ip, identity, helo)

    def _quick(self, ip: str, identity: str, helo: str) -> tuple[str, str] | None:
        """The verdict without leaving the loop (a rule, the verdict cache, or an
        evaluation whose every DNS answer is cached), else None."""
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
        verdict = self._check(ip, identity, helo, None)
        if verdict is not None:
            self._remember(key, now, verdict)
        return verdict

    async def _in_thread(self, ip: str, identity: str, helo: str) -> tuple[str, str]:
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        verdict = await loop.run_in_executor(self.pool, self._check, ip, identity, helo, loop)
        assert verdict is not None  # in a thread every lookup gets its answer
        self._remember(_key(ip, identity, helo), now, verdict)
        return verdict

    def _remember(self, key: tuple[str, str, str], now: float, verdict: tuple[str, str]) -> None:
        if verdict[0] != "temperror" and self.cache_ttl > 0:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key] = (now + self.cache_ttl, *verdict)

    def _check(
        self, ip: str, identity: str, helo: str, loop: asyncio.AbstractEventLoop | None
    ) -> tuple[str, str] | None:
        """pyspf's verdict; with no `loop` (called on the loop itself), from the DNS
        cache alone, and None as soon as it lacks an answer."""
        _tls.resolver = self.resolver
        _tls.loop = loop
        _tls.missed = False
        try:
            q = spf.query(i=ip, s=identity, h=helo, querytime=self.timeout)
            result, _code, why = q.check()
        except _NotCached:
            return None
        except Exception as e:  # pyspf raises on malformed input it did not expect
            verdict = "permerror", f"SPF evaluation failed: {e}"
        else:
            verdict = str(result), str(why)
        return None if _tls.missed else verdict
