"""SPF (RFC 7208) with pyspf, for MAIL FROM, or HELO when MAIL FROM is null.

pyspf is synchronous and does its own DNS. We replace its DNS function with one
that answers from our resolver's cache, or from the answers already fetched for
this evaluation, and at a name neither holds stops the evaluation. The loop then
fetches what was missing (awaiting, so other sessions go on) and pyspf starts
again from the top with it, until it needs nothing more. The 10-lookup and
2-void-lookup limits stay pyspf's (tested against the RFC 7208 suite).

Why start over rather than run pyspf in a worker thread that waits for each
answer (this module's first design): an SPF evaluation's lookups depend on each
other's answers, so they are one after another in any design, and a thread hop
costs more CPU than pyspf's whole evaluation from answers at hand (about 140 µs
a hop on a two-core VM, two per answer fetched, against about 50 µs for a typical
evaluation). A known sender domain, from a new IP or local part, is evaluated
synchronously, without a task. On repeat senders even that is skipped: verdicts
are cached per (client IP, identity) for a short time.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Awaitable
from typing import Annotated, Any, ClassVar, Self

import spf
from pydantic import Field

from gateway.config import Strict
from gateway.context import Context
from gateway.dns import DnsAnswer, Resolver
from gateway.facts import SpfFacts
from gateway.vocab import AuthResult, Stage

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# Passes of pyspf for one evaluation at most. Each pass stops at the first answer
# it lacks and the next one has it, so this bounds the distinct lookups; pyspf's
# own limits allow a record about 115 (10 DNS mechanisms, an MX lookup and 10 A
# lookups for each, the explanation). A typical evaluation takes 2 to 5.
MAX_PASSES = 128
# Terms of one SPF record, and of every record one evaluation reads: pyspf parses
# about 100,000 terms a second, on the event loop, and evaluates again from the
# start after each answer it lacked. Terms that need no DNS (ip4:, ip6:) are not
# bounded by the 10-lookup limit: ten records of 4,000 such terms cost 1.9 s a MAIL.
# Past either bound the evaluation is a permerror (RFC 7208 4.6: a record that
# cannot be processed); real records hold tens of terms.
MAX_RECORD_TERMS = 250
MAX_TERMS = 1000
# Characters of one term: a domain-spec names at most 253 octets once expanded, and
# pyspf splits a long one in time that grows with the square of its length (8,000
# characters held the loop for a second).
MAX_TERM_LENGTH = 512
# pyspf evaluates again from the top after each answer it lacked, so one evaluation
# parses its first records many times: terms parsed over all passes, at most.
MAX_PARSED_TERMS = 5000
# pyspf checks a term with a macro by a regular expression over the whole term once
# per label (its `expand`): the work is labels x length, 125,000 character steps for
# one term of 250 labels, and it is done again in every pass. The sum over all
# passes, at most (a real macro term, `exists:%{i}._spf.%{d}`, costs about 100).
MAX_MACRO_WORK = 200_000

_tls = threading.local()


class _Missing(Exception):
    """The evaluation needs an answer it does not have yet."""


class _Answers:
    """What one evaluation has asked for: the answers fetched for it (kept even when
    the cache may not keep them: a temporary error, a TTL of 0) and those it lacked."""

    __slots__ = ("fetched", "macro_work", "missing", "parsed", "resolver", "terms")

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.fetched: dict[tuple[str, str], DnsAnswer] = {}
        self.missing: set[tuple[str, str]] = set()
        self.terms = 0  # SPF terms handed to pyspf in this pass
        self.parsed = 0  # ... and in every pass of this evaluation
        self.macro_work = 0  # labels x length of the macro terms, over every pass

    def lookup(self, name: str, qtype: str) -> list[Any]:
        ans = self.fetched.get((name, qtype)) or self.resolver.cached(name, qtype)
        if ans is None:
            # Noted as well as raised: pyspf swallows every exception around the
            # exp= lookup, and a pass that lacked anything is not used.
            self.missing.add((name, qtype))
            raise _Missing(name)
        if ans.temporary:
            raise spf.TempError(f"DNS {ans.status.value} for {name}/{qtype}")
        if qtype == "TXT":
            self._count_terms(name, ans.records)
        return [((name, qtype), v) for v in ans.records]

    def _count_terms(self, name: str, records: tuple[Any, ...]) -> None:
        for strings in records:
            text = b"".join(strings) if isinstance(strings, tuple) else b""
            if text[:7].lower() != b"v=spf1 " and text.lower() != b"v=spf1":
                continue
            # Split as pyspf splits (on spaces only: a tab stays inside a term).
            terms = [t for t in text.split(b" ") if t]
            n = len(terms) - 1
            if any(len(t) > MAX_TERM_LENGTH for t in terms):
                raise spf.PermError(
                    f"SPF record of {name} has a term over {MAX_TERM_LENGTH} characters"
                )
            if n > MAX_RECORD_TERMS:
                raise spf.PermError(
                    f"SPF record of {name} has {n} terms (at most {MAX_RECORD_TERMS})"
                )
            self.terms += n
            if self.terms > MAX_TERMS:
                raise spf.PermError(f"SPF records hold over {MAX_TERMS} terms in all")
            self.parsed += n
            if self.parsed > MAX_PARSED_TERMS:
                raise spf.PermError(f"SPF evaluation parses over {MAX_PARSED_TERMS} terms")
            self.macro_work += sum((t.count(b".") + 1) * len(t) for t in terms if b"%" in t)
            if self.macro_work > MAX_MACRO_WORK:
                raise spf.PermError("SPF records' macros are too costly to check")

    async def fetch_missing(self) -> None:
        """Every answer the last pass lacked, asked for at once (usually one)."""
        wanted = sorted(self.missing)
        self.missing.clear()
        found = await asyncio.gather(*(self.resolver.query(n, t) for n, t in wanted))
        self.fetched.update(zip(wanted, found, strict=True))


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup contract: [((name, qtype), value), ...]; TempError on failure."""
    answers: _Answers = _tls.answers
    return answers.lookup(name, qtype)


spf.DNSLookup = _lookup


def _validated_ptrs(q: Any) -> list[str]:
    """pyspf's validated_ptrs as RFC 7208 5.5 has it: a DNS error on the PTR lookup
    makes the mechanism match nothing, and one on the A lookup of a PTR name skips
    that name (pyspf made either a temperror: a sender whose PTR name's CNAME chain
    loops was deferred for good). At most 10 names (MAX_PTR) are validated."""
    try:
        names = q.dns_ptr(q.i)
    except spf.TempError:
        return []
    out = []
    for name in names[: spf.MAX_PTR]:
        try:
            addresses = q.dns_a(name, q.A)
        except spf.TempError:
            continue
        if q.cidrmatch(addresses, q.cidrmax):
            out.append(name)
    return out


spf.query.validated_ptrs = _validated_ptrs


def _key(ip: str, identity: str, helo: str) -> tuple[str, str, str]:
    """The verdict cache's key: domains and local parts compared without case."""
    return (ip, identity.lower(), helo.lower())


class SpfOptions(Strict):
    enabled: bool = True
    # Seconds a verdict is reused for the same client IP and identity.
    result_cache_ttl: Annotated[float, Field(ge=0)] = 60.0
    # Overall DNS time for one evaluation (RFC 7208 4.6.4 suggests at least 20):
    # the runner's time budget for this check, in place of the policy's check_timeout.
    timeout: Annotated[float, Field(gt=0)] = 10.0


class SpfCheck:
    name: ClassVar[str] = "spf"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL})
    symbols: ClassVar[frozenset[str]] = frozenset(f"spf.{r}" for r in RESULTS)
    reputation: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.budget: float | None = SpfOptions().timeout
        self.cache_ttl = 60.0
        self._cache: dict[tuple[str, str, str], tuple[float, str, str]] = {}

    def configured(self, options: SpfOptions) -> Self:
        """This check under `options`: a new object sharing the verdict cache."""
        new = copy.copy(self)
        new.budget = options.timeout
        new.cache_ttl = options.result_cache_ttl
        return new

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        """Synchronous when no DNS answer has to be waited for: a repeat sender whose
        verdict is cached, or a sender domain whose records are."""
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
        if isinstance(verdict, tuple):
            return self._record(ctx, scope, domain, helo, verdict)
        return self._run_async(ctx, scope, domain, identity, helo, verdict)

    async def _run_async(
        self, ctx: Context, scope: str, domain: str, identity: str, helo: str, answers: _Answers
    ) -> tuple[str, ...]:
        verdict = await self._complete(ctx.client_ip, identity, helo, answers, ctx.deadline)
        return self._record(ctx, scope, domain, helo, verdict)

    @staticmethod
    def _record(
        ctx: Context, scope: str, domain: str, helo: str, verdict: tuple[str, str]
    ) -> tuple[str, ...]:
        result, why = verdict
        prop = {"smtp.mailfrom": domain} if scope == "mailfrom" else {"smtp.helo": helo}
        ctx.auth.append(AuthResult("spf", result, prop, why))
        ctx.facts.spf = SpfFacts(domain, result)
        return (f"spf.{result}",)

    def _cached(self, key: tuple[str, str, str]) -> tuple[str, str] | None:
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1], hit[2]
        return None

    async def evaluate(self, ip: str, identity: str, helo: str) -> tuple[str, str]:
        """(result, explanation) for one identity; the entry point the RFC suite tests."""
        verdict = self._quick(ip, identity, helo)
        if isinstance(verdict, tuple):
            return verdict
        deadline = asyncio.get_running_loop().time() + (self.budget or SpfOptions().timeout)
        return await self._complete(ip, identity, helo, verdict, deadline)

    def _quick(self, ip: str, identity: str, helo: str) -> tuple[str, str] | _Answers:
        """The verdict without waiting (a rule, the verdict cache, or a pass of pyspf
        with every answer in the DNS cache), else what that pass lacked."""
        domain = (identity.rpartition("@")[2] or helo).rstrip(".")  # pyspf's choice too
        if domain and "." not in domain:
            # RFC 7208 4.3: a domain that is not multi-label is "none" at once (a TLD's
            # record is not the sender's); pyspf would look it up and evaluate it.
            return "none", "not a multi-label domain"
        key = _key(ip, identity, helo)
        hit = self._cached(key)
        if hit is not None:
            return hit
        answers = _Answers(self.resolver)
        verdict = self._pass(ip, identity, helo, answers)
        if verdict is None:
            return answers
        self._remember(key, verdict)
        return verdict

    async def _complete(
        self, ip: str, identity: str, helo: str, answers: _Answers, deadline: float
    ) -> tuple[str, str]:
        """Fetch what the last pass lacked and pass again, until the deadline the
        runner gave: then the verdict is a temperror (RFC 7208 4.6.4), always, as the
        runner waits a little longer than the deadline for exactly this answer."""
        verdict: tuple[str, str] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                for _ in range(MAX_PASSES):
                    await answers.fetch_missing()
                    verdict = self._pass(ip, identity, helo, answers)
                    if verdict is not None:
                        break
                else:
                    return "permerror", f"SPF evaluation needs over {MAX_PASSES} rounds of DNS"
        except TimeoutError:
            return "temperror", f"SPF evaluation incomplete after {self.budget:g} s"
        assert verdict is not None
        self._remember(_key(ip, identity, helo), verdict)
        return verdict

    def _remember(self, key: tuple[str, str, str], verdict: tuple[str, str]) -> None:
        if verdict[0] != "temperror" and self.cache_ttl > 0:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key] = (time.monotonic() + self.cache_ttl, *verdict)

    def _pass(self, ip: str, identity: str, helo: str, answers: _Answers) -> tuple[str, str] | None:
        """pyspf's verdict from the answers at hand; None if it lacked any."""
        _tls.answers = answers
        answers.terms = 0
        try:
            q = spf.query(i=ip, s=identity, h=helo, querytime=0)
            result, _code, why = q.check()
        except _Missing:
            return None
        except Exception as e:  # pyspf raises on malformed input it did not expect
            verdict = "permerror", f"SPF evaluation failed: {e}"
        else:
            verdict = str(result), str(why)
        return None if answers.missing else verdict
