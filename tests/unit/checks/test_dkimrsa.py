"""The OpenSSL-backed RSA verifier agrees with dkimpy's own on every input.

Both are run on the same message and key record; they must return the same
boolean or raise the same dkimpy exception class. Keys are made per run.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from functools import partial
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks import dkimrsa
from tests.support.dkimkeys import Key, ed25519_key, rsa_key
from tests.support.edits import EDITS, edit_byte
from tests.unit.checks.signing import MSG, _sign


def _outcome(fn: Callable[[], bool]) -> str:
    try:
        return "pass" if fn() else "false"
    except Exception as e:  # the class is what must agree
        return type(e).__name__


def _ours(message: bytes, key: dkimrsa.PublicKey) -> bool:
    d = dkim.DKIM(message)
    return dkimrsa.verify(d, 0, d.verify_headerprep(0), key)


def _both(message: bytes, record: bytes) -> tuple[str, str]:
    """(dkimpy's outcome, ours) for signature 0 of `message` under key `record`."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return record

    theirs = _outcome(lambda: dkim.DKIM(message).verify(idx=0, dnsfunc=dnsfunc))

    def ours_fn() -> bool:
        key = dkimrsa.KeyCache().get("s1._domainkey.example.test", record)
        assert key is not None
        return _ours(message, key)

    ours = _outcome(ours_fn)
    return theirs, ours


@pytest.fixture(scope="module")
def key() -> Key:
    return rsa_key(1024)


def _record(key: Key) -> bytes:
    return key.dns.encode()


def _tamper_body(m: bytes) -> bytes:
    return m.replace(b"Hello Bob", b"Hello Eve")


def _tamper_header(m: bytes) -> bytes:
    return m.replace(b"Subject: hello", b"Subject: HELLO")


def _refold_header(m: bytes) -> bytes:  # relaxed header canonicalisation absorbs this
    return m.replace(b"Subject: hello  there", b"Subject:  hello\r\n there")


def _unsigned_header(m: bytes) -> bytes:
    return b"X-Added: by a list\r\n" + m


def _second_from(m: bytes) -> bytes:  # dkimpy's bug#644046 guard: must fail
    return m.replace(b"To: bob", b"From: mallory@evil.test\r\nTo: bob")


def _append_body(m: bytes) -> bytes:
    return m + b"-- \r\nlist footer\r\n"


def _whitespace_body(m: bytes) -> bytes:
    return m.replace(b"  spaced   line \r\n", b" spaced line\r\n")


CASES: list[tuple[str, dict[str, Any], Callable[[bytes], bytes], str]] = [
    ("relaxed/simple", {}, lambda m: m, "pass"),
    ("simple/simple", {"canonicalize": (b"simple", b"simple")}, lambda m: m, "pass"),
    ("relaxed/relaxed", {"canonicalize": (b"relaxed", b"relaxed")}, lambda m: m, "pass"),
    ("sha1", {"signature_algorithm": b"rsa-sha1"}, lambda m: m, "pass"),
    ("body changed", {}, _tamper_body, "ValidationError"),
    ("signed header changed", {}, _tamper_header, "false"),
    ("header refolded, relaxed", {}, _refold_header, "pass"),
    ("header refolded, simple", {"canonicalize": (b"simple", b"simple")}, _refold_header, "false"),
    ("unsigned header added", {}, _unsigned_header, "pass"),
    ("second From", {}, _second_from, "false"),
    ("l= and appended body", {"length": True}, _append_body, "pass"),
    ("appended body without l=", {}, _append_body, "ValidationError"),
    ("body whitespace, relaxed", {"canonicalize": (b"relaxed", b"relaxed")}, _whitespace_body,
     "pass"),
    ("body whitespace, simple", {}, _whitespace_body, "ValidationError"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kw", "change", "expected"), CASES, ids=[c[0] for c in CASES])
def test_same_verdict_as_dkimpy(
    key: Key, name: str, kw: dict[str, Any], change: Callable[[bytes], bytes], expected: str
) -> None:
    message = change(_sign(key, **kw))
    theirs, ours = _both(message, _record(key))
    assert theirs == ours == expected, name


ED = ed25519_key()


@pytest.mark.parametrize(
    ("name", "kw", "change", "expected"),
    [c for c in CASES if c[0] != "sha1"],
    ids=[c[0] for c in CASES if c[0] != "sha1"],
)
def test_same_verdict_as_dkimpy_ed25519(
    name: str, kw: dict[str, Any], change: Callable[[bytes], bytes], expected: str
) -> None:
    """RFC 8463: the same table, signed with ed25519; OpenSSL verifies here, nacl in dkimpy."""
    message = change(_sign(ED, signature_algorithm=b"ed25519-sha256", **kw))
    theirs, ours = _both(message, ED.dns.encode())
    assert theirs == ours == expected, name


def test_key_of_the_other_kind_does_not_verify(key: Key) -> None:
    """An RSA signature under an ed25519 key record, and the reverse: never a pass."""
    rsa_signed = _sign(key)
    ed_signed = _sign(ED, signature_algorithm=b"ed25519-sha256")
    for message, record in ((rsa_signed, ED.dns.encode()), (ed_signed, _record(key))):
        theirs, ours = _both(message, record)
        assert "pass" not in (theirs, ours)
        assert ours == "ValidationError"


def test_wrong_key_and_garbage_signature(key: Key) -> None:
    other = rsa_key(1024)
    message = _sign(key)
    assert _both(message, _record(other)) == ("false", "false")
    head, _, tail = message.partition(b" b=")
    flipped = head + b" b=" + (b"B" if tail[:1] == b"A" else b"A") + tail[1:]
    assert _both(flipped, _record(key)) == ("false", "false")


def test_signature_of_the_wrong_length_is_invalid(key: Key) -> None:
    """RFC 8017 8.2.2 step 1: a signature not exactly k octets long is invalid.

    dkimpy reads b= as an integer, so leading zero octets slip through; OpenSSL
    (and so this gateway) refuses them. No signer produces such a signature.
    """
    message = _sign(key)
    head, _, tail = message.partition(b" b=")
    padded = head + b" b=AAAA" + tail  # three zero octets in front
    assert _both(padded, _record(key)) == ("pass", "false")


def _pkcs1_record(bits: int) -> tuple[bytes, bytes]:
    """(PEM private key, key record with p= as a bare PKCS#1 RSAPublicKey)."""
    k = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def test_pkcs1_public_key_accepted_like_dkimpy() -> None:
    pem, record = _pkcs1_record(1024)
    message = bytes(dkim.sign(MSG, b"s1", b"example.test", pem)) + MSG
    assert _both(message, record) == ("pass", "pass")


def test_small_key_is_a_key_format_error_after_a_good_signature(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cryptography will not make a key under 1024 bits: raise the floor instead.
    monkeypatch.setattr(dkimrsa, "MIN_BITS", 2048)
    pem, record = _pkcs1_record(1024)
    message = bytes(dkim.sign(MSG, b"s1", b"example.test", pem)) + MSG
    key = dkimrsa.KeyCache().get("s1", record)
    assert key is not None and key.bits == 1024
    with pytest.raises(dkim.KeyFormatError, match="too small"):
        _ours(message, key)
    # dkimpy with the same floor: the same verdict
    with pytest.raises(dkim.KeyFormatError, match="too small"):
        dkim.DKIM(message, minkey=2048).verify(dnsfunc=lambda n, timeout=5: record)


@pytest.mark.parametrize(
    "record",
    [
        b"v=DKIM1; k=rsa; p=!!!notbase64",
        b"v=DKIM1; k=rsa; p=" + base64.b64encode(b"not a key"),
        b"v=DKIM1; k=dsa; p=AAAA",
        b"v=DKIM2; k=rsa; p=AAAA",
        b"v=DKIM1; k=rsa",
        b"v=DKIM1; k=rsa; p",
    ],
)
def test_unusable_key_records_raise_key_format_error_like_dkimpy(record: bytes) -> None:
    with pytest.raises((dkim.DKIMException, binascii.Error)):
        dkim.evaluate_pk(b"s1", record)
    cache = dkimrsa.KeyCache()
    for _ in range(2):  # the cached failure raises again
        with pytest.raises(dkim.DKIMException):
            cache.get("s1", record)


def test_tlsrpt_only_key_fails_mail_like_dkimpy(key: Key) -> None:
    record = _record(key) + b"; s=tlsrpt"
    message = _sign(key)
    assert _both(message, record) == ("ValidationError", "ValidationError")


def test_ed25519_key_and_cache_is_bounded() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    cache = dkimrsa.KeyCache(size=2)
    ed = cache.get("e", ed25519_key().dns.encode())
    assert isinstance(ed.public, ed25519.Ed25519PublicKey) and ed.bits == 256
    assert cache.bits("e", ed25519_key().dns.encode()) == 2048  # priced as RSA-2048
    keys = [rsa_key(1024) for _ in range(3)]
    got = [cache.get("k", k.dns.encode()) for k in keys]
    assert [g.bits for g in got] == [1024] * 3
    assert len(cache) == 2


@pytest.mark.parametrize(
    "message",
    [
        MSG,
        b"From: a@b.test\r\nSubject: no body\r\n",  # no blank line: all header
        b"From: a@b.test\r\n\r\n",  # empty body
        b"\r\nbody only\r\n\r\nmore\r\n",  # no header fields
        b"From: a@b.test\r\n folded\r\nX: y\r\n\r\n\r\n\r\nbody\r\n\r\n\r\n",
        b"From: a@b.test\r\n\r\nline\r\n.\r\n\rx\r\n",
        b"From mbox@line Sun\r\nFrom: a@b.test\r\n\r\nx\r\n",
        b"",
    ],
)
def test_fast_parse_of_crlf_messages_equals_dkimpys(message: bytes) -> None:
    ours = dkimrsa.parse(message, crlf_clean=True)
    theirs = dkim.DKIM(message)
    assert (ours.headers, ours.body) == (theirs.headers, theirs.body)
    slow = dkimrsa.parse(message, crlf_clean=False)  # anything else: dkimpy's own parse
    assert (slow.headers, slow.body) == (theirs.headers, theirs.body)


@pytest.mark.parametrize("message", [b" leading: continuation\r\n\r\n", b"no colon\r\n\r\n"])
def test_fast_parse_fails_like_dkimpy(message: bytes) -> None:
    with pytest.raises(Exception) as theirs:
        dkim.DKIM(message)
    with pytest.raises(Exception) as ours:
        dkimrsa.parse(message, crlf_clean=True)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


@settings(max_examples=500, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"From", b"from", b"To", b"Subject", b"X-A"]),
            st.binary(max_size=20).map(lambda b: bytes(b" \tab\r\n:"[x % 7] for x in b)),
        ),
        max_size=6,
    ),
    st.lists(st.sampled_from([b"from", b"to", b"subject", b"x-b"]), max_size=5),
    st.booleans(),
)
def test_header_hash_matches_dkimpys(
    headers: list[tuple[bytes, bytes]], include: list[bytes], relaxed: bool
) -> None:
    import hashlib

    from dkim.canonicalization import CanonicalizationPolicy

    sigheader = (b"DKIM-Signature", b" v=1; a=rsa-sha256;\r\n b=abc\r\n def\r\n")
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/simple" if relaxed else b"simple")
    theirs, ours = hashlib.sha256(), hashlib.sha256()
    hs = [[n, v] for n, v in headers]
    dkim.hash_headers(theirs, canon, canon.canonicalize_headers(hs), include, sigheader, {})
    dkimrsa.hash_headers(ours, relaxed, hs, include, sigheader)
    assert ours.digest() == theirs.digest()


@pytest.mark.parametrize(
    "record", [b"v=DKIM1; k=rsa; p=", b"v=DKIM1; p= ; k=rsa", b"k=ed25519; p=", b"p="]
)
def test_empty_p_is_a_revoked_key_decided_once(record: bytes) -> None:
    cache = dkimrsa.KeyCache()
    for _ in range(2):
        with pytest.raises(dkimrsa.KeyRevoked):
            cache.get("s1", record)


def test_bad_ed25519_key_is_refused_by_the_cache_as_dkimpy_would() -> None:
    record = b"v=DKIM1; k=ed25519; p=AAAA"
    with pytest.raises(dkim.KeyFormatError):
        dkim.evaluate_pk(b"s1", record)
    with pytest.raises(dkim.KeyFormatError):
        dkimrsa.KeyCache().get("s1", record)


def test_headerprep_matches_dkimpys(key: Key) -> None:
    """headerprep against dkimpy's verify_headerprep on signed messages, one and two
    signatures, a signature whose tags do not parse and one missing a tag."""
    signed = _sign(key)
    twice = _sign(key, signed)
    broken = signed.replace(b"v=1;", b"v=1; =x;", 1)
    missing = signed.replace(b"a=rsa-sha256;", b"", 1)

    def run(fn: Callable[[int], Any], idx: int) -> Any:
        try:
            return fn(idx)
        except dkim.DKIMException as e:
            return (type(e), str(e))

    for message in (signed, twice, broken, missing, MSG):
        for idx in range(3):
            ours, theirs = dkimrsa.parse(message, crlf_clean=False), dkim.DKIM(message)
            assert run(partial(dkimrsa.headerprep, ours), idx) == run(theirs.verify_headerprep, idx)
            assert getattr(ours, "include_headers", None) == getattr(
                theirs, "include_headers", None
            )


_RANDOM_KEYS = {"rsa": rsa_key(1024), "ed25519": ED}


@settings(max_examples=150, derandomize=True, deadline=None)
@given(
    st.sampled_from(["rsa", "ed25519"]),
    st.sampled_from([(b"relaxed", b"simple"), (b"relaxed", b"relaxed"), (b"simple", b"simple")]),
    st.lists(st.sampled_from(["signature", "headers", "body"]), min_size=3, max_size=3),
    EDITS,
)
def test_random_edits_get_dkimpys_verdict(
    kind: str,
    canon: tuple[bytes, bytes],
    regions: list[str],
    edits: list[tuple[float, str, int]],
) -> None:
    """Bytes replaced, deleted or inserted in the signature field, the other header
    fields or the body of a good message (every line end left CRLF, as the DATA
    reader guarantees): the whole verifier, ours against dkimpy's, agrees on pass."""
    key = _RANDOM_KEYS[kind]
    algorithm = b"ed25519-sha256" if kind == "ed25519" else b"rsa-sha256"
    m = bytearray(_sign(key, canonicalize=canon, signature_algorithm=algorithm))
    for region, (where, op, byte) in zip(regions, edits, strict=False):
        head, body = m.find(b"\r\nFrom:") + 2, m.find(b"\r\n\r\n") + 4
        spans = {"signature": (0, head - 2), "headers": (head, body - 4), "body": (body, len(m))}
        a, b = spans[region]
        if b <= a:
            continue
        edit_byte(m, a + int(where * (b - a)), op, byte)
    theirs, ours = _both(bytes(m), key.dns.encode())
    assert (theirs == "pass") == (ours == "pass"), (theirs, ours)


def test_a_key_of_a_huge_public_exponent_costs_what_it_costs() -> None:
    """A sender may publish an RSA key of 3072 bits whose exponent is nearly as long
    (OpenSSL allows it there): each verification then costs 180 times one with 65537,
    about 6 ms. Its weight sends the work to the thread."""
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod

    from gateway.checks.dkim import on_loop

    n = rsa_mod.generate_private_key(65537, 3072).public_key().public_numbers().n
    huge = rsa_mod.RSAPublicNumbers((1 << 3069) | 1, n).public_key()
    der = huge.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    common = rsa_key(3072).dns.encode()
    cache = dkimrsa.KeyCache()
    assert cache.bits("s._domainkey.a.test", record) >= 3072 * 13  # sqrt(3070 / 17)
    assert cache.bits("c._domainkey.a.test", common) == 3072
    assert on_loop(4096, [b"relaxed/simple"], [3072])
    assert not on_loop(4096, [b"relaxed/simple"], [cache.bits("s._domainkey.a.test", record)])
