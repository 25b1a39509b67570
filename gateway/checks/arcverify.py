"""ARC chain validation (RFC 8617 5.2) to dkimpy's verdicts, with OpenSSL's RSA.

Why ours: dkimpy's arc_verify checks every ARC-Message-Signature and every seal
with its pure-Python RSA (about 0.45 ms each, so a chain of two hops cost about
2 ms of CPU) and asks for keys through a blocking function, so it had to run in a
worker thread. Here the chain's structure is read first, with no key
(`parse_chain`); the caller fetches the keys it names through the async resolver;
then `validate` verifies with OpenSSL, in microseconds, on the event loop.

Only the newest ARC-Message-Signature is verified: it alone decides the chain
(5.2 step 4). dkimpy verifies the older ones as well, for a per-instance report
that nothing here reads, and the verdicts do not depend on them.

The order of the checks, the verdicts and their reasons are dkimpy's (its
`ARC.verify` and `verify_instance`), so that the gateway's ARC results do not
change with this module; tests/unit/checks/test_arcverify.py holds it to dkimpy's
verdicts on chains made by dkimpy's signer and altered in every way that counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.util import InvalidTagValueList

from gateway.checks import dkimrsa
from gateway.wire import number

ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_INSTANCE = re.compile(rb"[\s;]?i\s*=\s*(\d+)", re.MULTILINE | re.IGNORECASE)

# RFC 8617 4.2.1: instances are numbered 1 to 50 (dkimpy accepts any number).
MAX_INSTANCE = 50
# (chain status, domain of the newest seal, reason); status is pass, fail or none.
Verdict = tuple[str, str | None, str]
# Key name (s._domainkey.d) -> its key; raises dkim.DKIMException for a key that is
# missing or unusable. (An ed25519 key cannot verify an rsa-sha256 signature, nor an RSA
# key an ed25519-sha256 one: not valid.)
KeyLookup = Callable[[str], dkimrsa.PublicKey]


@dataclass(slots=True)
class ArcSet:
    """One instance's signatures, parsed and validated, ready to verify."""

    instance: int
    ams: dict[bytes, bytes]
    ams_include: list[bytes]
    ams_field: Any  # the raw ARC-Message-Signature field, as the message has it
    seal: dict[bytes, bytes]
    seal_include: list[bytes]
    seal_field: tuple[bytes, bytes]


@dataclass(slots=True)
class Chain:
    d: Any  # the message, parsed by dkimrsa.parse
    sets: list[ArcSet]  # newest first, every instance from the newest down to 1

    def verifies(self) -> list[str]:
        """The key of each verification validation may make: the newest message
        signature's, then every seal's."""
        return [dkimrsa.key_name(self.sets[0].ams), *(dkimrsa.key_name(s.seal) for s in self.sets)]

    def key_names(self) -> list[str]:
        """The keys validation needs, each once."""
        return sorted(set(self.verifies()))


def parse_chain(message: bytes, *, crlf_clean: bool) -> Chain | Verdict:
    """The chain, or the verdict when its structure alone decides it (no ARC set,
    a duplicate or missing field, a malformed or forbidden tag)."""
    try:
        d = dkimrsa.parse(message, crlf_clean=crlf_clean)
    except (dkim.DKIMException, IndexError):
        return "fail", None, "header section not parsable"
    fields = _sorted_fields(d.headers)
    if not fields or fields[0][0] == 0:
        return "none", None, "Message is not ARC signed"
    if fields[0][0] > MAX_INSTANCE:
        return "fail", None, f"ARC instance {fields[0][0]} is over {MAX_INSTANCE}"
    sets: list[ArcSet] = []
    for instance in range(fields[0][0], 0, -1):
        try:
            sets.append(_arc_set(d, fields, instance))
        except dkim.DKIMException as e:
            # dkimpy names the newest seal's domain only once its set has passed.
            sealer = _text(sets[0].seal[b"d"]) if sets else None
            return "fail", sealer, str(e)
    return Chain(d, sets)


def validate(chain: Chain, keys: KeyLookup) -> Verdict:
    """dkimpy's ARC.verify verdict for a chain whose structure is sound."""
    newest = chain.sets[0]
    sealer = _text(newest.seal[b"d"])
    if not _verified(chain.d, newest.ams, newest.ams_include, newest.ams_field, keys):
        return "fail", sealer, "Most recent ARC-Message-Signature did not validate"
    for s in chain.sets:
        cv = s.seal[b"cv"]
        if cv == dkim.CV_Fail:
            why = f"ARC-Seal[{s.instance}] reported failure, the chain is terminated"
            return "fail", sealer, why
        if not _verified(chain.d, s.seal, s.seal_include, s.seal_field, keys):
            return "fail", sealer, f"ARC-Seal[{s.instance}] did not validate"
        if (s.instance == 1) != (cv == dkim.CV_None):
            return "fail", sealer, f"ARC-Seal[{s.instance}] reported invalid status {cv!r}"
    return "pass", sealer, "success"


def _sorted_fields(headers: list[Any]) -> list[tuple[int, tuple[bytes, bytes]]]:
    """dkimpy's sorted_arc_headers: every ARC field with an instance number, relaxed,
    newest instance first (and within one: seal, message signature, results)."""
    found = []
    for name, value in headers:
        if name.lower().rstrip() not in ARC_FIELDS:
            continue
        relaxed = dkimrsa.relaxed_field(name, value)
        m = _INSTANCE.search(relaxed[1])
        if m is not None:
            # Over six digits is no instance (MAX_INSTANCE is 50): one that fails.
            instance = number(m.group(1), 6)
            found.append((MAX_INSTANCE + 1 if instance is None else instance, relaxed))
    found.sort(key=lambda f: (f[0], f[1][0].lower(), f[1][1].lower()), reverse=True)
    return found


def _arc_set(d: Any, fields: list[tuple[int, tuple[bytes, bytes]]], instance: int) -> ArcSet:
    """dkimpy's verify_instance up to its two verifications, raising what it raises."""
    up_to = [f for i, f in fields if i <= instance]
    mine: dict[bytes, bytes] = {}
    for i, (name, value) in fields:
        if i != instance:
            continue
        if name in mine:
            raise dkim.MessageFormatError(f"Duplicate {_LABEL[name]} for instance {instance}")
        mine[name] = value
    if len(mine) != len(ARC_FIELDS):
        raise dkim.MessageFormatError(f"Incomplete ARC set for instance {instance}")

    ams = _tags(mine[b"arc-message-signature"])
    _validate(ams, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"])
    ams_include = dkimrsa.signed_names(ams)
    if b"arc-seal" in ams_include:
        raise dkim.ParameterError("The Arc-Message-Signature MUST NOT sign ARC-Seal")
    # The message signature signs itself as written (its own c=), not relaxed.
    marker = b" i=" + ams[b"i"] + b";"
    raw = [
        h for h in d.headers if h[0].lower() == b"arc-message-signature" and marker in h[1].lower()
    ]
    if not raw:
        raise dkim.MessageFormatError(f"ARC-Message-Signature[{instance}] not found as written")
    # No c=: relaxed/relaxed, as dkimpy and the ValiMail interop suite have it
    # (its ams_fields_c_na signs relaxed, leaves c= out, and expects a pass),
    # although RFC 8617 4.1.2 giving the AMS DKIM's semantics reads as simple/simple.
    ams.setdefault(b"c", b"relaxed/relaxed")

    seal_value = mine[b"arc-seal"]
    seal = _tags(seal_value)
    _validate(seal, [b"i", b"a", b"b", b"cv", b"d", b"s"])
    if b"h" in seal:
        raise dkim.ValidationError("h= tag not permitted in ARC-Seal header field")
    seal.setdefault(b"c", b"relaxed/relaxed")
    # The seal signs every ARC field up to its instance, oldest first, itself last.
    seal_include = [name for name, _ in reversed(up_to)][:-1]
    return ArcSet(
        instance, ams, ams_include, raw[0], seal, seal_include, (b"ARC-Seal", b" " + seal_value)
    )


def _validate(sig: dict[bytes, bytes], mandatory: list[bytes]) -> None:
    """dkimpy's checks of an ARC signature's tags, with DKIM's algorithms: RFC 8617
    4.1.3 reuses them, and RFC 8463 added ed25519-sha256 to DKIM, which other
    validators accept in ARC; dkimpy's ARC mode knows rsa-sha256 only. Its other
    checks do not read a=, so they run on the tags with a= in a form it knows."""
    if sig.get(b"a") == b"ed25519-sha256":
        sig = {**sig, b"a": b"rsa-sha256"}
    # dkimpy's own pattern for b= backtracks quadratically where it fails (20 KB of
    # vertical tabs, which relaxed canonicalisation keeps, cost 1.6 s): refused here
    # first, with its words, in linear time; what passes this, its pattern passes
    # without backtracking.
    b = sig.get(b"b")
    known = all(f in sig for f in mandatory) and sig.get(b"a") in ARC_ALGORITHMS
    if b is not None and known and not dkimrsa.base64ish(b):
        raise dkim.ValidationError(f"b= value is not valid base64 ({b!r})")
    dkim.validate_signature_fields(sig, mandatory, True)


ARC_ALGORITHMS = frozenset(dkim.ARC_HASH_ALGORITHMS)

_LABEL = {
    b"arc-authentication-results": "ARC-Authentication-Results",
    b"arc-message-signature": "ARC-Message-Signature",
    b"arc-seal": "ARC-Seal",
}


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return dkimrsa.parse_tags(value)
    except InvalidTagValueList as e:
        raise dkim.MessageFormatError(str(e)) from None


def _verified(
    d: Any, sig: dict[bytes, bytes], include: list[bytes], field: Any, keys: KeyLookup
) -> bool:
    """One signature, as dkimpy's verify_sig: any problem with it or its key is False."""
    try:
        return dkimrsa.verify_sig(d, sig, include, field, keys(dkimrsa.key_name(sig)))
    except dkim.DKIMException:
        return False


def _text(v: bytes) -> str | None:
    return v.decode("ascii", "replace").lower() or None
