"""gateway.checks.arcverify against dkimpy's arc_verify: the same verdict, sealer and
reason on chains made by dkimpy's own signer, intact and altered in each way that
decides a chain (RFC 8617 5.2). Keys are made per run; DNS is a dict on both sides
(the check's resolver path is tested in tests/integration/test_dkim_dmarc.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks import arcverify, dkimrsa
from tests.support.dkimkeys import arc_seal_ed25519, ed25519_key, rsa_key
from tests.support.edits import EDITS, edit_byte

RSA = rsa_key()
ED = ed25519_key()
MSG = (
    b"From: Alice <alice@signed.test>\r\nTo: bob@example.test\r\nSubject: hello\r\n"
    b"Date: Sun, 22 Nov 2026 08:00:00 +0000\r\nMessage-ID: <a1@signed.test>\r\n\r\n"
    b"Hello Bob,\r\n  spaced   line \r\nSee you.\r\n"
)
HOPS = ("one.test", "two.test", "three.test")
ZONE: dict[str, bytes] = {f"arc._domainkey.{hop}": RSA.dns.encode() for hop in HOPS}
ZONE["arc._domainkey.ed.test"] = ED.dns.encode()


def chain(hops: int, message: bytes = MSG, *, seen: str = "pass") -> bytes:
    """The message as `hops` forwarders in turn would seal it, each recording the
    previous chain as `seen` (dkimpy's signer takes cv= from the arc= it finds)."""
    for n, hop in enumerate(HOPS[:hops]):
        verdict = f"; arc={seen}" if n else ""
        ar = f"Authentication-Results: {hop}; spf=pass smtp.mailfrom=signed.test{verdict}\r\n"
        message = ar.encode() + message
        sealed = dkim.arc_sign(message, b"arc", hop.encode(), RSA.private, hop.encode())
        message = b"".join(sealed) + message
    return message


def theirs(message: bytes, zone: dict[str, bytes]) -> arcverify.Verdict:
    """dkimpy's verdict in arcverify's terms (as gateway/checks/arc.py read it)."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return zone.get(name.decode().rstrip(".").lower())

    cv, results, why = dkim.arc_verify(message, dnsfunc=dnsfunc)
    status = cv.decode() if isinstance(cv, bytes) else "fail"  # None: cv=fail seen
    sealer = None
    if results:
        newest: dict[str, Any] = max(results, key=lambda r: int(r["instance"]))
        sealer = newest["as-domain"].decode().lower() or None
    return status, sealer, str(why)


def ours(message: bytes, zone: dict[str, bytes]) -> arcverify.Verdict:
    cache = dkimrsa.KeyCache()

    def key(name: str) -> dkimrsa.PublicKey:
        if name not in zone:
            raise dkim.KeyFormatError(f"missing public key: {name}")
        return cache.get(name, zone[name])

    parsed = arcverify.parse_chain(message, crlf_clean=True)
    return parsed if isinstance(parsed, tuple) else arcverify.validate(parsed, key)


def _field(message: bytes, name: bytes, instance: int) -> tuple[int, int]:
    """Where the field `name` of `instance` starts and ends (continuations included)."""
    start = rb"(?im)^" + name + rb":[^\r]*?\bi=" + str(instance).encode() + rb";"
    m = re.search(start + rb"(?:.*\r\n)(?:[ \t].*\r\n)*", message)
    assert m is not None, (name, instance)
    return m.start(), m.end()


def drop(name: bytes, instance: int) -> Callable[[bytes], bytes]:
    def f(m: bytes) -> bytes:
        a, b = _field(m, name, instance)
        return m[:a] + m[b:]

    return f


def duplicate(name: bytes, instance: int) -> Callable[[bytes], bytes]:
    def f(m: bytes) -> bytes:
        a, b = _field(m, name, instance)
        return m[:a] + m[a:b] + m[a:b] + m[b:]

    return f


def edit(name: bytes, instance: int, old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def f(m: bytes) -> bytes:
        a, b = _field(m, name, instance)
        assert old in m[a:b], (name, old)
        return m[:a] + m[a:b].replace(old, new, 1) + m[b:]

    return f


AAR, AMS, AS = b"ARC-Authentication-Results", b"ARC-Message-Signature", b"ARC-Seal"
CASES: list[tuple[str, int, Callable[[bytes], bytes], dict[str, bytes]]] = [
    ("intact, one hop", 1, lambda m: m, ZONE),
    ("intact, three hops", 3, lambda m: m, ZONE),
    ("unsigned field added on top", 2, lambda m: b"X-Later: 1\r\n" + m, ZONE),
    ("body altered", 2, lambda m: m.replace(b"See you.", b"See you!"), ZONE),
    ("signed header altered", 2, lambda m: m.replace(b"Subject: hello", b"Subject: HELLO"), ZONE),
    ("body whitespace only (relaxed)", 1, lambda m: m.replace(b"  spaced", b" spaced"), ZONE),
    ("oldest results altered", 2, edit(AAR, 1, b"spf=pass", b"spf=fail"), ZONE),
    ("newest results altered", 3, edit(AAR, 3, b"arc=pass", b"arc=none"), ZONE),
    ("newest seal reports fail", 2, edit(AS, 2, b"cv=pass", b"cv=fail"), ZONE),
    ("oldest seal says pass", 2, edit(AS, 1, b"cv=none", b"cv=pass"), ZONE),
    ("newer hop saw a failed chain", 2, lambda m: chain(2, seen="fail"), ZONE),
    ("newest seal removed", 2, drop(AS, 2), ZONE),
    ("middle message signature removed", 3, drop(AMS, 2), ZONE),
    ("oldest results removed", 2, drop(AAR, 1), ZONE),
    ("newest results twice", 2, duplicate(AAR, 2), ZONE),
    ("seal twice", 1, duplicate(AS, 1), ZONE),
    ("message signature signs the seal", 1, edit(AMS, 1, b"h=", b"h=arc-seal:"), ZONE),
    ("seal with h=", 1, edit(AS, 1, b"cv=", b"h=from; cv="), ZONE),
    ("message signature without bh=", 1, edit(AMS, 1, b"bh=", b"xh="), ZONE),
    ("seal with a= rsa-sha1", 1, edit(AS, 1, b"a=rsa-sha256", b"a=rsa-sha1"), ZONE),
    ("seal's key missing", 2, lambda m: m, {k: v for k, v in ZONE.items() if "one" not in k}),
    ("message signature's key revoked", 1, lambda m: m, {**ZONE, "arc._domainkey.one.test": b"p="}),
    ("newest instance renumbered", 2, edit(AS, 2, b"i=2", b"i=3"), ZONE),
    ("no instance numbers", 1, lambda m: re.sub(rb"\bi=1;", b"", m), ZONE),
]  # fmt: skip


@pytest.mark.parametrize(("name", "hops", "change", "zone"), CASES, ids=[c[0] for c in CASES])
def test_same_verdict_as_dkimpy(
    name: str, hops: int, change: Callable[[bytes], bytes], zone: dict[str, bytes]
) -> None:
    message = change(chain(hops))
    assert ours(message, zone) == theirs(message, zone)


def test_the_cases_reach_every_verdict() -> None:
    """The table is not all passes or all one failure: the comparison above means
    something only if dkimpy itself tells these chains apart."""
    seen = {theirs(change(chain(hops)), zone)[2].split("[")[0] for _, hops, change, zone in CASES}
    assert {
        "success",
        "Most recent ARC-Message-Signature did not validate",
        "ARC-Seal",
        "Message is not ARC signed",
    } <= seen
    assert len(seen) >= 8, seen


def test_only_the_newest_message_signature_is_verified() -> None:
    """An older hop's message signature broke on the way (a later hop changed the
    body): the chain still passes, as dkimpy also says, and its key is not needed."""
    message = chain(2)
    parsed = arcverify.parse_chain(message, crlf_clean=True)
    assert isinstance(parsed, arcverify.Chain)
    assert parsed.key_names() == ["arc._domainkey.one.test", "arc._domainkey.two.test"]
    asked: list[str] = []
    cache = dkimrsa.KeyCache()

    def key(name: str) -> dkimrsa.PublicKey:
        asked.append(name)
        return cache.get(name, ZONE[name])

    assert arcverify.validate(parsed, key) == ("pass", "two.test", "success")
    # The newest signature and the two seals: three verifications, no more.
    assert len(asked) == 3


def test_instance_over_fifty_fails() -> None:
    """RFC 8617 4.2.1 numbers instances 1 to 50; dkimpy accepts more."""
    one = chain(1)
    renumbered = re.sub(rb"\bi=1;", b"i=51;", one)
    status, _, why = ours(renumbered, ZONE)
    assert (status, why) == ("fail", "ARC instance 51 is over 50")


def test_an_ed25519_chain_validates() -> None:
    """RFC 8617 takes DKIM's algorithms, and RFC 8463 added ed25519-sha256 to them;
    other validators accept it in ARC (dkimpy's ARC mode knows rsa-sha256 only)."""
    ar = b"Authentication-Results: ed.test; spf=pass smtp.mailfrom=signed.test\r\n"
    sealed = arc_seal_ed25519(ar + MSG, ED, "ed.test")
    assert ours(sealed, ZONE) == ("pass", "ed.test", "success")
    # And it is the signature that decides: one changed byte of the body fails.
    assert ours(sealed.replace(b"\r\n\r\n", b"\r\n\r\nX", 1), ZONE)[0] == "fail"


def test_a_seal_whose_key_is_ed25519_does_not_validate() -> None:
    """ARC signs with rsa-sha256 only (RFC 8617 4.1.3); an ed25519 key cannot verify
    it. dkimpy's nacl raises on the RSA-sized signature, which the old check turned
    into "ARC validation error"; here it is the seal that did not validate."""
    sealed = edit(AS, 1, b"d=one.test", b"d=ed.test")(chain(1))
    with pytest.raises(ValueError):
        theirs(sealed, ZONE)
    assert ours(sealed, ZONE) == ("fail", "ed.test", "ARC-Seal[1] did not validate")


@pytest.mark.parametrize(("instance", "cv"), [(0, b"none"), (1, b"pass")])
def test_a_seal_must_say_none_first_and_pass_after(instance: int, cv: bytes) -> None:
    """RFC 8617 5.2 step 3: cv=none on instance 1 only. dkimpy's signer never writes
    the other forms with a good seal, so the parsed cv= is set here after parsing (the
    seal is verified over the field as written, which still holds)."""
    parsed = arcverify.parse_chain(chain(2), crlf_clean=True)
    assert isinstance(parsed, arcverify.Chain)
    cache = dkimrsa.KeyCache()

    def key(name: str) -> dkimrsa.PublicKey:
        return cache.get(name, ZONE[name])

    assert arcverify.validate(parsed, key)[0] == "pass"
    s = parsed.sets[instance]
    s.seal[b"cv"] = cv
    assert arcverify.validate(parsed, key) == (
        "fail",
        "two.test",
        f"ARC-Seal[{s.instance}] reported invalid status {cv!r}",
    )


_BASES = [chain(1), chain(2), chain(3)]
_ARC_FIELD = re.compile(rb"(?im)^arc-[^\r]*(?:\r\n[ \t][^\r]*)*")


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.sampled_from(range(len(_BASES))), EDITS)
def test_random_edits_inside_arc_fields_get_dkimpys_status(
    base: int, edits: list[tuple[float, str, int]]
) -> None:
    """Bytes replaced, deleted or inserted anywhere in the ARC fields of a good chain:
    the same status as dkimpy's. Where dkimpy raises (an older message signature's
    broken base64, which is not verified here; a field it cannot find), the check
    reports a broken chain, so that counts as fail; the sealer is compared when
    neither side raised."""
    m = bytearray(_BASES[base])
    for where, op, byte in edits:
        spans = [f.span() for f in _ARC_FIELD.finditer(bytes(m[: m.find(b"\r\n\r\n")]))]
        a, b = spans[int(where * len(spans))]
        edit_byte(m, a + int(where * len(spans) % 1 * (b - a)), op, byte)
    message = bytes(m)
    mine = ours(message, ZONE)
    try:
        dkimpy: tuple[str, str | None, str] = theirs(message, ZONE)
    except Exception:
        assert mine[0] == "fail"
        return
    assert mine[:2] == dkimpy[:2]
