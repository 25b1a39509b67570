"""DKIM (RFC 6376; ed25519 per RFC 8463): every signature, not only the first.

Keys are fetched through our resolver first (so they are cached within TTL
and a DNS failure is a temperror, never a fail). `dkimrsa` parses, canonicalises
and verifies to dkimpy's rules, with OpenSSL for RSA and ed25519. A small message
is verified on the event loop (tens of microseconds: a thread hop would cost more
than the work); one whose canonicalisation and hashing would hold the loop is
verified in a worker thread (see on_loop).
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Awaitable, Iterable
from typing import Annotated, Any, ClassVar, Self

import dkim
from dkim.util import InvalidTagValueList
from pydantic import Field

from gateway.checks import dkimrsa
from gateway.checks.base import OffLoopCheck
from gateway.config import Strict
from gateway.context import Context
from gateway.dns import DnsAnswer, DnsStatus, Resolver
from gateway.facts import DkimSignature
from gateway.vocab import AuthResult, Stage
from gateway.wire import header_section, number

RESULTS = ("pass", "fail", "none", "temperror", "permerror")
# RFC 8301 3.1: "rsa-sha1 MUST NOT be used for signing or verifying". dkimpy still
# verifies it; a forger needs only a SHA-1 collision on a signed header set.
REFUSED_ALGORITHMS = frozenset({b"rsa-sha1"})
OFFLOOP_BYTES = 256 * 1024
# Relaxed body canonicalisation (dkimrsa.relaxed_body) costs about 2 ns a byte on
# text, up to 11 on whitespace built to be dear, against under 1 ns for hashing a
# simple body; the weight holds the dear case to the same half millisecond.
RELAXED_WEIGHT = 12


# Relaxed header canonicalisation (dkimrsa.relaxed_field) costs 5 to 20 ns a byte of
# the fields a signature covers, up to 75 on white space built to be dear. Header
# fields of real mail are a few kilobytes (an eight-hop ARC chain about 10); past
# this many bytes the verification goes to the thread, whatever else it costs.
HEADER_LOOP_BYTES = 32 * 1024


def on_loop(
    size: int, canonicalizations: list[bytes], key_bits: Iterable[int] = (), header: int = 0
) -> bool:
    """Verify on the event loop? Only while the work stays under about half a
    millisecond: a 256 KiB message with simple bodies, a 21 KiB one with relaxed,
    the RSA verifications (`key_bits`: one entry per signature to verify, in
    KeyCache.bits's terms); and not over HEADER_LOOP_BYTES of `header` fields to
    canonicalise."""
    if header > HEADER_LOOP_BYTES:
        return False
    cost = sum(verify_weight(bits) for bits in key_bits)
    for c in canonicalizations:
        body = c.partition(b"/")[2].strip().lower()
        cost += size * (RELAXED_WEIGHT if body == b"relaxed" else 1)
    return cost <= OFFLOOP_BYTES


def verify_weight(bits: int) -> int:
    """An RSA verification in on_loop's unit (a byte of simple body hashed, about 2
    ns): 20 µs at 2048 bits, growing with the square of the size (243 µs at 8192, a
    size a sender may choose: five such signatures would hold the loop 1.2 ms)."""
    return 10_000 * bits * bits // (2048 * 2048)


class _Job:
    """A message's signatures between parsing and verification."""

    __slots__ = (
        "crlf_clean",
        "failed",
        "keys",
        "message",
        "names",
        "parsed",
        "pending",
        "preps",
    )

    def __init__(self, message: bytes, parsed: Any, crlf_clean: bool) -> None:
        self.message = message
        self.crlf_clean = crlf_clean
        self.parsed = parsed  # the whole message parsed (small ones), else None
        # Per signature: dkimrsa.headerprep()'s result, or the permerror of one that
        # cannot be verified.
        self.preps: list[Any] = []
        self.names: dict[int, str] = {}  # signature index -> where its key is published
        self.pending: set[str] = set()  # key names not in the DNS cache yet
        self.keys: dict[str, bytes | None] = {}
        self.failed: dict[str, str] = {}  # key name -> temperror reason

    def take(self, name: str, ans: DnsAnswer) -> None:
        if ans.temporary:
            self.failed[name] = f"key lookup {ans.status.value}"
        else:
            self.keys[name] = key_record(ans)  # None, no key: permerror


# What may be reported of a signature that could not be verified (RFC 8601's
# header.d and header.s are a domain and a selector; anything else is left out).
_NAME = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
_ALGORITHM = re.compile(rb"[a-z0-9]{1,16}-[a-z0-9]{1,16}")


def _unverifiable(d: Any, idx: int, reason: str) -> DkimSignature:
    """A permerror, with the d=, s= and a= that can still be read from the signature,
    so that the Authentication-Results reader sees whose signature it was."""
    values = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    try:
        tags = dkimrsa.parse_tags(values[idx])
    except (IndexError, InvalidTagValueList):
        tags = {}

    def good(tag: bytes, pattern: re.Pattern[bytes]) -> str:
        v = tags.get(tag, b"")
        return v.decode("ascii") if pattern.fullmatch(v) else ""

    domain, selector = good(b"d", _NAME).lower(), good(b"s", _NAME)
    return DkimSignature(domain, selector, good(b"a", _ALGORITHM), "permerror", reason[:200])


def _text(v: Any) -> str:
    return v.decode("ascii", "replace") if isinstance(v, bytes) else str(v or "")


def key_record(ans: DnsAnswer) -> bytes | None:
    """The key record a TXT answer holds (its strings joined), if it holds one."""
    if ans.status is not DnsStatus.OK or not ans.records:
        return None
    return b"".join(ans.records[0])


class DkimOptions(Strict):
    enabled: bool = True
    # Signatures verified per message; more are ignored (a cheap DoS otherwise).
    max_signatures: Annotated[int, Field(ge=1, le=50)] = 5


class DkimCheck(OffLoopCheck):
    name: ClassVar[str] = "dkim"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    symbols: ClassVar[frozenset[str]] = frozenset(f"dkim.{r}" for r in RESULTS)
    reputation: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset()
    budget: float | None = None

    def __init__(self, resolver: Resolver, *, threads: int = 4) -> None:
        super().__init__(resolver, threads=threads, name="dkim")
        self.max_signatures = DkimOptions().max_signatures
        self.keys = dkimrsa.KeyCache()

    def configured(self, options: DkimOptions) -> Self:
        """This check under `options`: a new object sharing the threads and keys."""
        new = copy.copy(self)
        new.max_signatures = options.max_signatures
        return new

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        """Synchronous when every key is in the DNS cache and the message is small
        (the common case for repeat senders): no task, no timer, no thread."""
        message = ctx.message
        if not message:
            return ("dkim.none",)
        # The session's DATA reader makes every line end CRLF (check_wire).
        job = self._prepare(message, crlf_clean=True)
        if isinstance(job, list):
            return self._record(ctx, job)
        return self._finish(ctx, job)

    async def _finish(self, ctx: Context, job: _Job) -> tuple[str, ...]:
        return self._record(ctx, await self._complete(job))

    def _record(self, ctx: Context, sigs: list[DkimSignature]) -> tuple[str, ...]:
        ctx.facts.dkim = tuple(sigs)
        ctx.auth.extend(s.auth_result() for s in sigs)
        if not sigs:
            ctx.auth.append(AuthResult("dkim", "none"))  # RFC 8601 2.7.1: not signed
        return (f"dkim.{aggregate(sigs)}",)

    async def verify(self, message: bytes, *, crlf_clean: bool = False) -> list[DkimSignature]:
        """One result per DKIM-Signature (up to max_signatures); the tested entry point."""
        job = self._prepare(message, crlf_clean=crlf_clean)
        return job if isinstance(job, list) else await self._complete(job)

    def _prepare(self, message: bytes, *, crlf_clean: bool) -> list[DkimSignature] | _Job:
        """Parse the signatures and take their keys from the DNS cache; the result
        when that is all it takes, else the job that still needs DNS or a thread."""
        small = len(message) <= OFFLOOP_BYTES
        # A large message: only its header section is parsed on the loop.
        try:
            d = dkimrsa.parse(message if small else header_section(message), crlf_clean=crlf_clean)
        except (dkim.DKIMException, IndexError):
            # A header line that is not a field, or a leading continuation: dkimpy
            # cannot parse the section. That is the message's fault, permanently;
            # never a check error (which the policy turns into a tempfail).
            if b"dkim-signature" in header_section(message).lower():
                return [DkimSignature("", "", "", "permerror", "header section not parsable")]
            return []
        count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
        count = min(count, self.max_signatures)
        if count == 0:
            return []
        job = _Job(message, d if small else None, crlf_clean)
        for idx in range(count):
            try:
                prep = dkimrsa.headerprep(d, idx)
            except dkim.DKIMException as e:
                job.preps.append(_unverifiable(d, idx, str(e)))
                continue
            if not prep:
                job.preps.append(_unverifiable(d, idx, "unparsable signature"))
                continue
            job.preps.append(prep)
            if prep[0].get(b"a") in REFUSED_ALGORITHMS:
                continue  # no key is needed to refuse it
            name = job.names[idx] = dkimrsa.key_name(prep[0])
            ans = self.resolver.cached(name, "TXT")
            if ans is None:
                job.pending.add(name)
            else:
                job.take(name, ans)
        if job.pending or not self._on_loop(job):
            return job
        return self._verify_all(job)

    def _on_loop(self, job: _Job) -> bool:
        """Verify on the loop? Decided once the keys are at hand, as their size counts."""
        if job.parsed is None:
            return False
        canons = [p[0].get(b"c", b"simple/simple") for p in job.preps if type(p) is tuple]
        bits = [self.keys.bits(n, r) for n in job.names.values() if (r := job.keys.get(n))]
        # Each signature canonicalises the fields it names: at most the header section.
        end = job.message.find(b"\r\n\r\n")
        return on_loop(len(job.message), canons, bits, len(job.message) if end < 0 else end)

    async def _complete(self, job: _Job) -> list[DkimSignature]:
        for name in sorted(job.pending):  # nearly always one: the same d= and s=
            job.take(name, await self.resolver.query(name, "TXT"))
        job.pending.clear()
        if self._on_loop(job):
            return self._verify_all(job)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._verify_all, job)

    def _verify_all(self, job: _Job) -> list[DkimSignature]:
        keys = job.keys

        out = []
        d = job.parsed or dkimrsa.parse(job.message, crlf_clean=job.crlf_clean)
        for idx, prep in enumerate(job.preps):
            if isinstance(prep, DkimSignature):
                out.append(prep)
                continue
            sig = prep[0]
            domain, selector = _text(sig.get(b"d")).lower(), _text(sig.get(b"s"))
            algo = _text(sig.get(b"a"))
            length = number(sig.get(b"l", b""), 76)
            b = _text(sig.get(b"b")).replace(" ", "")
            keyname = job.names.get(idx, "")
            if sig.get(b"a") in REFUSED_ALGORITHMS:
                result, reason = "permerror", f"{algo} is not accepted (RFC 8301)"
            elif keyname in job.failed:
                result, reason = "temperror", job.failed[keyname]
            else:
                result, reason = self._verify_one(d, idx, prep, keyname, keys.get(keyname))
            out.append(DkimSignature(domain, selector, algo, result, reason[:200], length, b))
        return out

    def _verify_one(
        self, d: Any, idx: int, prep: Any, keyname: str, record: bytes | None
    ) -> tuple[str, str]:
        """(result, reason) for one signature, per RFC 6376 6.1 and RFC 8601 2.7.1.

        dkimpy folds every key problem into False; the outcomes of RFC 6376 6.1.2
        for the key itself (missing, revoked, unusable) are told apart here first.
        """
        if record is None:
            return "permerror", "no key for signature"
        try:
            key = self.keys.get(keyname, record)
        except dkimrsa.KeyRevoked:
            return "fail", "key revoked"
        except dkim.DKIMException as e:
            return "permerror", f"bad key: {e}"
        why = dkimrsa.key_use_error(record, prep[0])
        if why is not None:
            return "permerror", why
        return _outcome(lambda: dkimrsa.verify(d, idx, prep, key))


def _outcome(verify: Any) -> tuple[str, str]:
    """(result, reason) of a verifier call; dkimpy's exceptions mapped to RFC 8601 results."""
    try:
        ok = verify()
    except dkim.KeyFormatError as e:
        msg = str(e)
        # An empty p= is a revoked key: a permanent failure of the signature (6.1.2).
        return ("fail", msg) if "revoked" in msg else ("permerror", msg)
    except dkim.ValidationError as e:
        return "fail", str(e)
    except dkim.DKIMException as e:
        return "permerror", str(e)
    except Exception as e:  # dkimpy on input it did not expect
        return "permerror", f"verification error: {e}"
    return ("pass", "") if ok else ("fail", "signature did not verify")


def aggregate(sigs: list[DkimSignature]) -> str:
    """One symbol for the message: any pass wins; then temperror, fail, permerror."""
    if not sigs:
        return "none"
    results = {s.result for s in sigs}
    for r in ("pass", "temperror", "fail", "permerror"):
        if r in results:
            return r
    return "none"
