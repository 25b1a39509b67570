"""DKIM (RFC 6376; ed25519 per RFC 8463): every signature, not only the first.

Keys are fetched through our resolver first (so they are cached within TTL
and a DNS failure is a temperror, never a fail). dkimpy parses and
canonicalises; RSA signatures are verified by OpenSSL (`dkimrsa`), ed25519 ones
by dkimpy. A message up to OFFLOOP_BYTES is verified on the event loop (tens of
microseconds: a thread hop would cost more than the work); a larger one in a
worker thread, so hashing a big message never holds the loop.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import dkim

from gateway.checks import dkimrsa
from gateway.checks.base import OffLoopCheck
from gateway.dns import DnsStatus, Resolver
from gateway.headers import header_section
from gateway.pipeline.results import AuthResult
from gateway.pipeline.stage import Context, Stage

RESULTS = ("pass", "fail", "none", "temperror", "permerror")
OFFLOOP_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class DkimSignature:
    domain: str
    selector: str
    algorithm: str
    result: str
    reason: str = ""
    body_length: int | None = None
    b: str = ""

    def auth_result(self) -> AuthResult:
        props = {"header.d": self.domain, "header.s": self.selector, "header.a": self.algorithm}
        if self.b:
            props["header.b"] = self.b[:8]
        reason = self.reason
        if self.body_length is not None:
            reason = f"{reason}; l={self.body_length}".lstrip("; ")
        return AuthResult("dkim", self.result, props, reason)


def _text(v: Any) -> str:
    return v.decode("ascii", "replace") if isinstance(v, bytes) else str(v or "")


class DkimCheck(OffLoopCheck):
    name: ClassVar[str] = "dkim"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    symbols: ClassVar[frozenset[str]] = frozenset(f"dkim.{r}" for r in RESULTS)
    reputation: ClassVar[bool] = True

    def __init__(self, resolver: Resolver, *, threads: int = 4) -> None:
        super().__init__(resolver, threads=threads, name="dkim")
        self.max_signatures = 5
        self.keys = dkimrsa.KeyCache()

    def configure(self, options: Any) -> None:
        self.max_signatures = options.max_signatures

    async def run(self, stage: Stage, ctx: Context) -> tuple[str, ...]:
        message = ctx.message
        if not message:
            return ("dkim.none",)
        sigs = await self.verify(message)
        ctx.dkim = sigs
        ctx.auth.extend(s.auth_result() for s in sigs)
        if not sigs:
            ctx.auth.append(AuthResult("dkim", "none"))  # RFC 8601 2.7.1: not signed
        return (f"dkim.{aggregate(sigs)}",)

    async def verify(self, message: bytes) -> list[DkimSignature]:
        """One result per DKIM-Signature (up to max_signatures); the tested entry point."""
        # On the loop: the signatures' tags only, from the headers alone. The full
        # parse, canonicalisation and hashing happen in the worker thread.
        d = dkim.DKIM(header_section(message))
        count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
        count = min(count, self.max_signatures)
        if count == 0:
            return []
        preps: list[dict[bytes, bytes] | str] = []
        names: set[str] = set()
        for idx in range(count):
            try:
                prep = d.verify_headerprep(idx)
            except dkim.DKIMException as e:
                preps.append(f"permerror: {e}")
                continue
            if not prep:
                preps.append("permerror: unparsable signature")
                continue
            sig = prep[0]
            preps.append(sig)
            names.add(f"{_text(sig.get(b's'))}._domainkey.{_text(sig.get(b'd'))}")
        keys: dict[str, bytes | None] = {}
        failed: dict[str, str] = {}
        answers = await asyncio.gather(*(self.resolver.query(n, "TXT") for n in names))
        for n, ans in zip(names, answers, strict=True):
            if ans.temporary:
                failed[n] = f"key lookup {ans.status.value}"
            elif ans.status is not DnsStatus.OK or not ans.records:
                keys[n] = None  # dkimpy: "missing public key" -> permerror
            else:
                keys[n] = b"".join(ans.records[0])
        if len(message) <= OFFLOOP_BYTES:
            return self._verify_all(message, preps, keys, failed)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._verify_all, message, preps, keys, failed)

    def _verify_all(
        self,
        message: bytes,
        preps: list[dict[bytes, bytes] | str],
        keys: dict[str, bytes | None],
        failed: dict[str, str],
    ) -> list[DkimSignature]:
        lowered = {k.lower(): v for k, v in keys.items()}

        def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
            return lowered.get(_text(name).lower().rstrip("."))

        out = []
        d = dkim.DKIM(message)
        for idx, prep in enumerate(preps):
            if isinstance(prep, str):
                out.append(DkimSignature("", "", "", "permerror", prep.split(": ", 1)[1]))
                continue
            domain, selector = _text(prep.get(b"d")).lower(), _text(prep.get(b"s"))
            algo = _text(prep.get(b"a"))
            length = int(prep[b"l"]) if prep.get(b"l", b"").isdigit() else None
            b = _text(prep.get(b"b")).replace(" ", "")
            keyname = f"{selector}._domainkey.{domain}"
            if keyname in failed:
                result, reason = "temperror", failed[keyname]
            else:
                result, reason = self._verify_one(d, idx, keyname, lowered.get(keyname), dnsfunc)
            out.append(DkimSignature(domain, selector, algo, result, reason[:200], length, b))
        return out

    def _verify_one(
        self, d: Any, idx: int, keyname: str, record: bytes | None, dnsfunc: Any
    ) -> tuple[str, str]:
        """(result, reason) for one signature, per RFC 6376 6.1 and RFC 8601 2.7.1.

        dkimpy folds every key problem into False; the outcomes of RFC 6376 6.1.2
        for the key itself (missing, revoked, unusable) are told apart here first.
        """
        if record is None:
            return "permerror", "no key for signature"
        if _REVOKED.search(record):
            return "fail", "key revoked"
        try:
            key = self.keys.get(keyname, record)
        except dkim.DKIMException as e:
            return "permerror", f"bad key: {e}"
        if key is None:  # not RSA: dkimpy verifies (and re-checks the key) itself
            try:
                dkim.evaluate_pk(keyname.encode(), record)
            except Exception as e:
                return "permerror", f"bad key: {e}"
            return _outcome(lambda: d.verify(idx=idx, dnsfunc=dnsfunc))
        return _outcome(lambda: dkimrsa.verify(d, idx, key))


_REVOKED = re.compile(rb"(?:^|;)\s*p\s*=\s*(?:;|$)")


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
