"""DKIM and DMARC: the checks' entry points against the loopback DNS server, and
end to end through real SMTP sessions."""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
from collections.abc import Callable
from typing import Any

import authres
import authres.arc
import authres.dmarc
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config
from gateway.checks.dkim import OFFLOOP_BYTES, DkimCheck, aggregate
from gateway.checks.dmarc import DmarcCheck, Undecided, from_domains, parse_record
from gateway.dns import Resolver
from gateway.facts import ArcFacts, SpfFacts
from tests.support.dkimkeys import ed25519_key, rsa_key, sign, sign_simple_by_hand
from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway, base_config

RSA = rsa_key()
ED = ed25519_key()

MSG = (
    b"From: Alice <alice@signed.test>\r\nTo: bob@example.test\r\nSubject: hello\r\n"
    b"Date: Sun, 22 Nov 2026 08:00:00 +0000\r\nMessage-ID: <1@signed.test>\r\n\r\n"
    b"Hello Bob.\r\nSee you.\r\n"
)


def _public_der(bits: int) -> str:
    """An RSA public key of that many bits (a number, not a real key: only its size is
    looked at), base64 DER as a DKIM key record holds it."""
    public = rsa.RSAPublicNumbers(65537, (1 << (bits - 1)) | 1).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def zone() -> dict[str, list[tuple[str, Any]]]:
    return {
        "rsa._domainkey.signed.test": [("TXT", RSA.dns)],
        "ed._domainkey.signed.test": [("TXT", ED.dns)],
        "revoked._domainkey.signed.test": [("TXT", "v=DKIM1; k=rsa; p=")],
        "slow._domainkey.signed.test": [("TIMEOUT", "")],
        "huge._domainkey.signed.test": [("TXT", f"v=DKIM1; k=rsa; p={_public_der(8200)}")],
        "signed.test": [("A", "192.0.2.1")],
        "_dmarc.signed.test": [("TXT", "v=DMARC1; p=reject")],
        "_dmarc.strict.test": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
        "_dmarc.sub.test": [("TXT", "v=DMARC1; p=reject; sp=quarantine; np=reject")],
        "exists.sub.test": [("A", "192.0.2.2")],
        "_dmarc.testing.test": [("TXT", "v=DMARC1; p=reject; t=y")],
        "_dmarc.sampled.test": [("TXT", "v=DMARC1; p=reject; pct=0")],
        "_dmarc.none.test": [("TXT", "v=DMARC1; p=none")],
        "_dmarc.slowdmarc.test": [("TIMEOUT", "")],
        "_dmarc.example.co.uk": [("TXT", "v=DMARC1; p=quarantine")],
        # DMARCbis tree walk: org record two levels up, no PSL entry for "walk.test".
        "_dmarc.org.walk.test": [("TXT", "v=DMARC1; p=reject; psd=n")],
        "_dmarc.walk.test": [("TXT", "v=DMARC1; p=none; psd=y")],
        # A subdomain's own record with a syntax error, under a p=reject parent.
        "_dmarc.typo.signed.test": [("TXT", "v=DMARC1; p=none; reject")],
        "_dmarc.nop.signed.test": [("TXT", "v=DMARC1; rua=mailto:d@signed.test")],
        "_dmarc.bad.signed.test": [("TXT", "v=DMARC1; p=rejct")],
        # An internationalised domain, bücher.test, as the DNS holds it (A-labels).
        "_dmarc.xn--bcher-kva.test": [("TXT", "v=DMARC1; p=reject")],
        "rsa._domainkey.xn--bcher-kva.test": [("TXT", RSA.dns)],
        "xn--bcher-kva.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    }


@pytest.fixture
def dns(dns_server: DnsServer) -> DnsServer:
    dns_server.add(zone())
    return dns_server


def resolver(dns: DnsServer) -> Resolver:
    return Resolver(
        config.Dns(nameservers=[dns.address], timeout=1.0)
    )  # a loaded machine answers late


def verify(dns: DnsServer, message: bytes, *, crlf_clean: bool = False) -> list[Any]:
    async def go() -> list[Any]:
        check = DkimCheck(resolver(dns))
        try:
            return await check.verify(message, crlf_clean=crlf_clean)
        finally:
            check.close()

    return asyncio.run(go())


# -- DKIM -------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "selector"), [(RSA, "rsa"), (ED, "ed")])
def test_dkim_valid_signatures(dns: DnsServer, key: Any, selector: str) -> None:
    [s] = verify(dns, sign(MSG, key, "signed.test", selector))
    assert (s.result, s.domain, s.selector) == ("pass", "signed.test", selector)
    assert s.algorithm == ("ed25519-sha256" if key is ED else "rsa-sha256")


def test_dkim_body_and_header_modified(dns: DnsServer) -> None:
    signed = sign(MSG, RSA, "signed.test", "rsa")
    [body] = verify(dns, signed.replace(b"See you.", b"See you!"))
    assert body.result == "fail" and "body hash" in body.reason
    [head] = verify(dns, signed.replace(b"Subject: hello", b"Subject: HELLO"))
    assert head.result == "fail"


def test_dkim_key_revoked_missing_or_unreachable(dns: DnsServer) -> None:
    # RFC 6376 6.1.2: an empty p= is a revoked key, a permanent failure of the signature.
    [revoked] = verify(dns, sign(MSG, RSA, "signed.test", "revoked"))
    assert (revoked.result, revoked.reason) == ("fail", "key revoked")
    [missing] = verify(dns, sign(MSG, RSA, "signed.test", "nokey"))
    assert (missing.result, missing.reason) == ("permerror", "no key for signature")
    [slow] = verify(dns, sign(MSG, RSA, "signed.test", "slow"))
    assert slow.result == "temperror"
    # Over 8192 bits: refused before any hashing, whatever the signature (RFC 8301 3.2
    # leaves the ceiling to the verifier; a huge key makes every message dear).
    for message in (MSG, MSG.replace(b"See you.", b"Altered.")):
        signed = sign(MSG, RSA, "signed.test", "huge").split(b"From:", 1)[0] + message
        [huge] = verify(dns, signed)
        assert (huge.result, huge.reason) == (
            "permerror",
            "bad key: public key too large: 8200 bits",
        )


def test_dkim_signature_that_does_not_cover_from_is_a_permerror(dns: DnsServer) -> None:
    """RFC 6376 6.1.1: a verifier MUST refuse a signature whose h= lacks From; such a
    pass could vouch for any From of the signing domain (DMARC would align it)."""
    [covered] = verify(dns, sign_simple_by_hand(MSG, RSA, "signed.test", "rsa", "from:subject"))
    assert covered.result == "pass"  # the hand-made signature is a real one
    [bare] = verify(dns, sign_simple_by_hand(MSG, RSA, "signed.test", "rsa", "subject:date"))
    assert (bare.result, bare.reason) == ("permerror", "From field not signed")
    # Whose signature it was still reaches Authentication-Results (RFC 8601 header.d).
    assert (bare.domain, bare.selector, bare.algorithm) == ("signed.test", "rsa", "rsa-sha256")


def test_an_unverifiable_signature_reports_only_names_that_are_names(dns: DnsServer) -> None:
    """What is read from a broken signature for header.d and header.s goes into our
    header: a value that is no domain or selector is left out, not quoted along."""
    broken = b'DKIM-Signature: v=1; a=rsa-sha256; d=bad"x;y=z.test; s=sel (x); h=from; b=AAAA\r\n'
    [sig] = verify(dns, broken + MSG)
    assert sig.result == "permerror"
    assert (sig.domain, sig.selector, sig.algorithm) == ("", "", "rsa-sha256")


def test_dkim_key_that_may_not_be_used_for_the_signature_is_a_permerror(dns: DnsServer) -> None:
    """RFC 6376 3.6.1 / 6.1.2, none of which dkimpy checks when it verifies: a key for
    another service (s=), one allowing other hashes only (h=), a strict key (t=s) for
    an i= in a subdomain of d=. The same keys, used as they allow, pass."""
    p = RSA.dns.split("p=", 1)[1]
    dns.add(
        {
            "web._domainkey.signed.test": [("TXT", f"v=DKIM1; k=rsa; s=web; p={p}")],
            "mail._domainkey.signed.test": [("TXT", f"v=DKIM1; k=rsa; s=web:email; p={p}")],
            "old._domainkey.signed.test": [("TXT", f"v=DKIM1; k=rsa; h=sha1; p={p}")],
            "both._domainkey.signed.test": [("TXT", f"v=DKIM1; k=rsa; h=sha1:sha256; p={p}")],
            "strict._domainkey.signed.test": [("TXT", f"v=DKIM1; k=rsa; t=y:s; p={p}")],
            "edweb._domainkey.signed.test": [("TXT", ED.dns + "; s=web")],
        }
    )
    refused = {
        "web": "key is not for email (s=web)",
        "old": "key does not allow rsa-sha256 (h=)",
        "edweb": "key is not for email (s=web)",
    }
    for selector, why in refused.items():
        [sig] = verify(dns, sign(MSG, ED if selector == "edweb" else RSA, "signed.test", selector))
        assert (sig.result, sig.reason) == ("permerror", why), selector
    for selector in ("mail", "both", "strict"):
        [sig] = verify(dns, sign(MSG, RSA, "signed.test", selector))
        assert sig.result == "pass", selector
    sub = dkim.sign(MSG, b"strict", b"signed.test", RSA.private, identity=b"a@sub.signed.test")
    [sig] = verify(dns, sub + MSG)
    assert (sig.result, sig.reason) == (
        "permerror",
        "key is strict (t=s) and i= names a subdomain of d=",
    )


def test_dkim_rsa_sha1_is_refused_without_a_key_lookup(dns: DnsServer) -> None:
    """RFC 8301 3.1: rsa-sha1 "MUST NOT be used for signing or verifying". dkimpy
    still verifies it, so this signature is a good one that only the rule refuses."""
    sha1 = dkim.sign(MSG, b"sha1", b"signed.test", RSA.private, signature_algorithm=b"rsa-sha1")
    assert dkim.verify(sha1 + MSG, dnsfunc=lambda *_, **__: RSA.dns.encode())  # a real one
    [sig] = verify(dns, sha1 + MSG)
    assert (sig.result, sig.domain, sig.algorithm, sig.reason) == (
        "permerror",
        "signed.test",
        "rsa-sha1",
        "rsa-sha1 is not accepted (RFC 8301)",
    )
    assert dns.asked("sha1._domainkey.signed.test") == 0
    # Beside an rsa-sha256 signature of the same domain, the message still passes.
    sigs = verify(dns, sha1 + sign(MSG, RSA, "signed.test", "rsa"))
    assert [s.result for s in sigs] == ["permerror", "pass"] and aggregate(sigs) == "pass"


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        # RFC 6376 3.5: i= is dkim-quoted-printable; "=40" is "@", "=2E" is ".".
        ("i=u=40signed.test; ", ("pass", "")),
        ("i=u@sub=2Esigned.test; ", ("pass", "")),
        ("i=u=40other.test; ", ("permerror", "i= domain is not a subdomain of d=")),
        ("i=u=4@signed.test; ", ("permerror", "i= value is not dkim-quoted-printable")),
        # q= is a list; unrecognised query methods "MUST be ignored".
        ("q=foo/bar:dns/txt:exam/ple; ", ("pass", "")),
        ("q=foo/bar; ", ("permerror", "q= value is not dns/txt")),
    ],
)
def test_dkim_tag_forms_rfc6376_allows(
    dns: DnsServer, tags: str, expected: tuple[str, str]
) -> None:
    signed = sign_simple_by_hand(MSG, RSA, "signed.test", "rsa", "from:subject", tags)
    [sig] = verify(dns, signed)
    assert (sig.result, sig.reason.split(" (")[0]) == expected


def test_dkim_two_signatures_one_good_one_bad(dns: DnsServer) -> None:
    good = sign(MSG, ED, "signed.test", "ed")
    # A second signature over different content: it covers "Subject: other", so it fails.
    bad_sig = sign(
        MSG.replace(b"Subject: hello", b"Subject: other"), RSA, "signed.test", "rsa"
    ).split(b"From:", 1)[0]
    sigs = verify(dns, bad_sig + good)
    assert sorted(s.result for s in sigs) == ["fail", "pass"]
    assert aggregate(sigs) == "pass"


def test_dkim_cached_key_small_and_large_messages(dns: DnsServer) -> None:
    """Every path: key fetched, key from cache (synchronous), and a message over
    OFFLOOP_BYTES verified in the worker thread; all agree on pass and fail."""
    big = MSG + b"x" * 70 * 5000 + b"\r\n"  # ~350 KB, over the 256 KiB threshold
    assert len(big) > OFFLOOP_BYTES

    async def go() -> list[str]:
        check = DkimCheck(resolver(dns))
        results = []
        try:
            for m in (MSG, MSG, big):  # 2nd: key in the cache
                signed = sign(m, RSA, "signed.test", "rsa")
                for msg in (signed, signed.replace(b"Bob.", b"Eve.")):
                    [s] = await check.verify(msg)
                    [fast] = await check.verify(msg, crlf_clean=True)  # the handler's path
                    assert fast.result == s.result
                    results.append(s.result)
        finally:
            check.close()
        return results

    assert asyncio.run(go()) == ["pass", "fail"] * 3


def test_dkim_unparsable_header_section_is_permerror_or_none(dns: DnsServer) -> None:
    signed = sign(MSG, RSA, "signed.test", "rsa")
    broken = signed.replace(b"To: bob", b"not a field\r\nTo: bob")
    unsigned = MSG.replace(b"To: bob", b"not a field\r\nTo: bob")
    leading = b" folded first\r\n" + signed
    for clean in (False, True):
        [s] = verify(dns, broken, crlf_clean=clean)
        assert (s.result, s.reason) == ("permerror", "header section not parsable")
        assert verify(dns, unsigned, crlf_clean=clean) == []
        [s] = verify(dns, leading, crlf_clean=clean)
        assert s.result == "permerror"


def test_dkim_body_length_reported(dns: DnsServer) -> None:
    [s] = verify(dns, sign(MSG, RSA, "signed.test", "rsa", length=True) + b"appended\r\n")
    assert s.result == "pass" and s.body_length == len(b"Hello Bob.\r\nSee you.\r\n")
    assert f"l={s.body_length}" in s.auth_result().reason


def _huge_numbers(message: bytes, tags: str) -> bytes:
    """`message` signed by signed.test, with each tag of `tags` 5,000 digits long."""
    signed = sign(message, RSA, "signed.test", "rsa")
    for tag in tags.encode():
        name = bytes([tag])
        value = b"9" * 5000
        found = re.search(rb"([ ;\t])" + name + rb"=[0-9]+", signed)
        if found is not None:
            signed = (
                signed[: found.start()]
                + found.group(1)
                + name
                + b"="
                + value
                + signed[found.end() :]
            )
        else:
            signed = signed.replace(b"v=1;", b"v=1; " + name + b"=" + value + b";", 1)
        assert b"=" + value in signed
    return signed


@pytest.mark.parametrize("tags", ["t", "x", "l", "tx"])
def test_dkim_numbers_of_any_length_are_read_without_crashing(dns: DnsServer, tags: str) -> None:
    """int() refuses more than 4,300 digits (ValueError): a 5,000-digit t=, x= or l=
    once crashed the check. Now a t= that long is in the future and an l= too long
    for the body, so the signature fails; an x= that long has not expired yet, so the
    signature is judged on its hash, which the edit broke. Never an exception."""
    message = _huge_numbers(MSG, tags)
    [s] = verify(dns, message)
    assert s.result in ("fail", "permerror"), s
    assert s.domain == "signed.test"


def test_dkim_signature_limit(dns: DnsServer) -> None:
    msg = MSG
    for _ in range(7):
        msg = sign(msg, ED, "signed.test", "ed")
    assert len(verify(dns, msg)) == 5


# -- DMARC --------------------------------------------------------------------------
def evaluate(
    dns: DnsServer,
    from_domain: str,
    spf: str | None,
    dkim_domains: list[str],
    method: str = "psl",
    unsure: Undecided | None = None,
) -> Any:
    async def go() -> Any:
        check = DmarcCheck(resolver(dns))
        check.org_method = method
        return await check.evaluate(from_domain, spf, dkim_domains, unsure)

    return asyncio.run(go())


def test_dmarc_alignment(dns: DnsServer) -> None:
    assert evaluate(dns, "signed.test", "signed.test", []).result == "pass"  # SPF only
    assert evaluate(dns, "signed.test", None, ["signed.test"]).result == "pass"  # DKIM only
    out = evaluate(dns, "signed.test", "other.test", ["other.test"])
    assert (out.result, out.disposition) == ("fail", "reject")
    # Relaxed: a subdomain of the From domain aligns; strict: it does not.
    assert evaluate(dns, "signed.test", "mail.signed.test", []).result == "pass"
    assert evaluate(dns, "strict.test", "mail.strict.test", []).result == "fail"
    assert evaluate(dns, "strict.test", None, ["strict.test"]).result == "pass"


def test_dmarc_sp_np_t_pct_none(dns: DnsServer) -> None:
    assert evaluate(dns, "exists.sub.test", None, []).disposition == "quarantine"  # sp
    assert evaluate(dns, "ghost.sub.test", None, []).disposition == "reject"  # np
    # RFC 9091 2.1: NODATA for A, AAAA and MX is non-existent too (a name with TXT only).
    dns.add({"txtonly.sub.test": [("TXT", "hello")], "mx.sub.test": [("MX", "10 mx.x.test.")]})
    assert evaluate(dns, "txtonly.sub.test", None, []).disposition == "reject"  # np
    assert evaluate(dns, "mx.sub.test", None, []).disposition == "quarantine"  # exists: sp
    out = evaluate(dns, "testing.test", None, [])
    assert (out.result, out.policy, out.disposition) == ("fail", "reject", "quarantine")
    assert evaluate(dns, "sampled.test", None, []).disposition == "quarantine"
    out = evaluate(dns, "none.test", None, [])
    assert (out.result, out.disposition) == ("fail", "none")
    assert evaluate(dns, "nopolicy.test", None, []).result == "none"


def test_dmarc_organizational_domain_psl_and_tree_walk(dns: DnsServer) -> None:
    out = evaluate(dns, "a.b.example.co.uk", None, [])
    assert (out.result, out.policy) == ("fail", "quarantine")  # org record via the PSL
    assert evaluate(dns, "a.b.example.co.uk", "x.example.co.uk", []).result == "pass"
    # Tree walk: from x.y.org.walk.test up to org.walk.test (psd=n: the org domain).
    out = evaluate(dns, "x.y.org.walk.test", None, [], method="tree-walk")
    assert (out.result, out.policy) == ("fail", "reject")
    assert (
        evaluate(dns, "x.y.org.walk.test", "mail.org.walk.test", [], method="tree-walk").result
        == "pass"
    )
    # ...but walk.test (psd=y) is a public suffix: other.walk.test is not aligned.
    assert (
        evaluate(dns, "x.y.org.walk.test", "other.walk.test", [], method="tree-walk").result
        == "fail"
    )


def test_dmarc_answers_at_once_from_the_cache_and_resumes_where_it_misses(
    dns: DnsServer,
) -> None:
    """The check's three paths agree: every answer fetched (a coroutine), every
    answer cached (a tuple at once: no task, no timer), and a cache that answers
    the first question but not the next (the coroutine takes over mid-walk).
    No name is asked of the DNS server twice."""
    from gateway.context import Context
    from gateway.vocab import Stage

    message = b"From: a@x.y.org.walk.test\r\nSubject: s\r\n\r\nbody\r\n"

    def ctx() -> Context:
        c = Context("s1", "192.0.2.1", 25, "smtp")
        c.wire = message
        c.facts.spf = SpfFacts("other.walk.test", "pass")
        return c

    async def go() -> list[Any]:
        check = DmarcCheck(resolver(dns))
        check.org_method = "tree-walk"
        out = []
        # Half warm: only the walk's first name is cached.
        await check.resolver.query("_dmarc.x.y.org.walk.test", "TXT")
        for _ in range(2):  # then fully warm
            c = ctx()
            symbols = check.run(Stage.DATA, c)
            out.append(type(symbols) is tuple)
            if not isinstance(symbols, tuple):
                symbols = await symbols
            assert c.facts.dmarc is not None
            out.append((symbols, c.facts.dmarc.policy, c.auth[-1].result))
        return out

    half, first, warm, second = asyncio.run(go())
    assert (half, warm) == (False, True)
    assert first == second == (("dmarc.fail", "dmarc.reject"), "reject", "fail")
    for name in ("x.y.org.walk.test", "y.org.walk.test", "org.walk.test"):
        assert dns.asked(f"_dmarc.{name}", "TXT") == 1, name
    # The SPF domain's walk: other.walk.test, then walk.test (psd=y: a public suffix).
    assert dns.asked("_dmarc.other.walk.test", "TXT") == 1
    assert dns.asked("_dmarc.walk.test", "TXT") == 1


def test_dmarc_temperror_when_lookup_times_out(dns: DnsServer) -> None:
    assert evaluate(dns, "slowdmarc.test", "slowdmarc.test", []).result == "temperror"


def test_dmarc_failure_that_rests_on_a_temporary_error_is_a_temperror(dns: DnsServer) -> None:
    """An input that could have aligned but is unknown (a temperror, a check that did
    not complete) makes a failure uncertain: temperror, unless the domain's policy
    would not act on the failure anyway."""

    def run(domain: str, unsure: Undecided, spf: str | None = None) -> tuple[str, str, str]:
        out = evaluate(dns, domain, spf, [], unsure=unsure)
        return out.result, out.disposition, out.reason

    assert run("signed.test", Undecided(dkim_domains=("signed.test",))) == (
        "temperror",
        "none",
        "the DKIM signature of signed.test could not be verified (temporary error)",
    )
    assert run("signed.test", Undecided(spf_domain="mail.signed.test"))[0] == "temperror"
    assert run("signed.test", Undecided(checks=frozenset({"dkim", "spf"})))[2] == (
        "the dkim and spf check did not complete"
    )
    assert run("testing.test", Undecided(dkim_domains=("testing.test",)))[0] == "temperror"
    # Inputs that could not have aligned change nothing: the failure stands.
    assert run("signed.test", Undecided(dkim_domains=("other.test",)))[:2] == ("fail", "reject")
    assert run("strict.test", Undecided(spf_domain="mail.strict.test"))[:2] == ("fail", "reject")
    # p=none: the failure is only reported; nothing to defer.
    assert run("none.test", Undecided(dkim_domains=("none.test",)))[:2] == ("fail", "none")
    # A pass needs no certainty about the rest.
    assert run("signed.test", Undecided(dkim_domains=("signed.test",)), spf="signed.test")[0] == (
        "pass"
    )


def test_dmarc_record_parsing_and_from_domains() -> None:
    rec = parse_record("x.test", "v=DMARC1; p=quarantine; sp=none; pct=50; adkim=s; t=y")
    assert rec is not None and (rec.p, rec.sp, rec.pct, rec.adkim, rec.testing) == (
        "quarantine",
        "none",
        50,
        "s",
        True,
    )
    # RFC 9989 4.7: a syntax error is discarded, not the record; an absent p is p=none.
    for text in ("v=DMARC1; p=none; reject", "v=DMARC1; sp=reject", "v=DMARC1;;"):
        rec = parse_record("x.test", text)
        assert rec is not None and rec.p == "none" and not rec.unusable, text
    # 4.10.1: an invalid p, sp or np is p=none with a reporting URI, else no processing.
    for text, unusable in [
        ("v=DMARC1; p=bogus", True),
        ("v=DMARC1; p=reject; sp=sometimes", True),
        ("v=DMARC1; p=rejected; rua=not a uri", True),
        ("v=DMARC1; p=bogus; rua=mailto:d@x.test", False),
        ("v=DMARC1; p=reject; np=never; rua=bad, mailto:d@x.test", False),
    ]:
        rec = parse_record("x.test", text)
        assert rec is not None and (rec.p, rec.sp, rec.np, rec.unusable) == (
            "none",
            None,
            None,
            unusable,
        ), text
    rec = parse_record("x.test", "v=DMARC1;p=reject; sp=none; np=reject;junk; psd=")
    assert rec is not None and (rec.p, rec.sp, rec.np, rec.psd) == ("reject", "none", "reject", "u")
    assert parse_record("x.test", "p=reject; v=DMARC1") is None
    assert parse_record("x.test", "v=DMARC2; p=reject") is None
    assert from_domains(b"From: a@x.test\r\n\r\n") == ["x.test"]
    assert from_domains(b"From: a@x.test, b@y.test\r\n\r\n") == ["x.test", "y.test"]
    assert from_domains(b"From: a@x.test\r\nFrom: b@x.test\r\n\r\n") is None
    assert from_domains(b"Subject: none\r\n\r\n") is None
    assert from_domains(b'From: "Doe, John" <j@x.test>\r\n\r\n') == ["x.test"]
    # RFC 6532: UTF-8 headers; the domain by its A-label. Octets that are not UTF-8 in
    # the domain make it no domain at all (malformed), in the display name they do not.
    assert from_domains("From: Jörg <j@Bücher.test>\r\n\r\n".encode()) == ["xn--bcher-kva.test"]
    assert from_domains("From: B\xfccher <j@x.test>\r\n\r\n".encode("latin-1")) == ["x.test"]
    assert from_domains("From: j@bücher.test".encode() + b"\x80\r\n\r\n") == []


# -- end to end ------------------------------------------------------------------------
def dmarc_config(backend: Backend, dns: DnsServer) -> dict[str, Any]:
    return base_config(
        backend.url,
        trusted_networks=[],
        authserv_id="mx.gw.test",
        dns={"nameservers": [dns.address], "timeout": 0.5},
    )


def test_spoofed_from_of_p_reject_domain_is_refused(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(dmarc_config(backend, dns))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("attacker@elsewhere.test")
        s.rcpt("bob@example.test")
        code, msg = s.data(MSG)  # From: alice@signed.test, no signature, SPF not aligned
        assert code == 550 and msg.startswith(b"5.7.1") and b"DMARC" in msg
    assert backend.messages() == []


def test_a_spoof_with_a_5000_digit_dkim_time_is_refused_not_deferred(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """The DKIM check once crashed on such a signature, and the crash became 451, so a
    spoof DMARC refuses was retried instead."""
    gw = gateway_factory(dmarc_config(backend, dns))
    code, msg = send(gw, b"DKIM-Signature: v=1; a=rsa-sha256; d=signed.test; s=rsa;"
                     b" h=from; t=" + b"1" * 5000 + b"; bh=AAAA; b=AAAA\r\n" + MSG)  # fmt: skip
    assert code == 550 and msg.startswith(b"5.7.1") and b"DMARC" in msg
    assert backend.messages() == []


def send(gw: Gateway, message: bytes) -> tuple[int, bytes]:
    """One transaction from a sender whose domain has no SPF record."""
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("bounces@elsewhere.test")
        s.rcpt("bob@example.test")
        return s.data(message)


def our_results(backend: Backend) -> list[Any]:
    """The results in our Authentication-Results header of the one delivered message."""
    [m] = backend.messages()
    head = m["data"].split(b"\r\n\r\n", 1)[0].decode().replace("\r\n\t", " ")
    [ar] = [h for h in head.split("\r\n") if h.startswith("Authentication-Results: mx.gw.test")]
    return list(authres.FeatureContext(authres.dmarc, authres.arc).parse(ar).results)


def test_signed_message_delivered_with_dkim_and_dmarc_pass(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(dmarc_config(backend, dns))
    assert send(gw, sign(MSG, RSA, "signed.test", "rsa"))[0] == 250
    results = {r.method: r for r in our_results(backend)}
    assert results["dkim"].result == "pass" and results["dkim"].header_d == "signed.test"
    assert results["dmarc"].result == "pass" and results["dmarc"].header_from == "signed.test"
    assert results["spf"].result in ("none", "neutral")  # elsewhere.test has no record


def test_a_subdomain_record_with_a_syntax_error_is_its_own_policy_not_the_parents(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """typo.signed.test publishes `p=none` with a stray word, nop.signed.test a record
    without p: both are p=none (RFC 9989 4.7); bad.signed.test a misspelt p and no rua:
    no DMARC processing (4.10.1), a permerror. Before, each record was thrown away
    and the parent's p=reject refused the mail."""
    gw = gateway_factory(dmarc_config(backend, dns))
    expected = {
        "typo.signed.test": "dmarc=fail",
        "nop.signed.test": "dmarc=fail",
        "bad.signed.test": "dmarc=permerror",
    }
    for n, (domain, result) in enumerate(expected.items(), 1):
        unsigned = MSG.replace(b"alice@signed.test", f"alice@{domain}".encode())
        assert send(gw, unsigned)[0] == 250, domain
        assert len(backend.messages()) == n
        head = backend.messages()[-1]["data"].split(b"\r\n\r\n", 1)[0].decode()
        assert result in head and f"header.from={domain}" in head, head
        assert "policy.dmarc=reject" not in head, head
    assert send(gw, MSG)[0] == 550  # the parent's own mail: p=reject, as before


def test_a_signature_not_covering_from_does_not_pass_dmarc(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """Its From can be anything: the signature vouches for none (before, 250)."""
    gw = gateway_factory(dmarc_config(backend, dns))
    signed = sign_simple_by_hand(MSG, RSA, "signed.test", "rsa", "subject:date")
    code, msg = send(gw, signed.replace(b"alice@signed.test", b"ceo@signed.test"))
    assert code == 550 and b"DMARC" in msg
    assert send(gw, sign_simple_by_hand(MSG, RSA, "signed.test", "rsa", "from:subject"))[0] == 250


def test_an_internationalised_from_domain_is_evaluated_by_its_a_label(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """RFC 9989 5.3.1 (and RFC 6532 headers): From: jörg@bücher.test is the domain
    xn--bcher-kva.test. Its signature, or an SPF pass for the U-label MAIL FROM,
    aligns; a spoof is refused. Before, the UTF-8 From was read as replacement
    characters and every such message was deferred (451)."""
    gw = gateway_factory(dmarc_config(backend, dns))
    message = (
        "From: Jörg <jörg@bücher.test>\r\nTo: bob@example.test\r\nSubject: grüße\r\n"
        "Date: Sun, 22 Nov 2026 08:00:00 +0000\r\nMessage-ID: <1@xn--bcher-kva.test>\r\n"
        "\r\nHallo.\r\n"
    ).encode()

    def deliver(mail_from: str, body: bytes) -> int:
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.ehlo("client.test")
            s.mail(mail_from, ["SMTPUTF8"])
            s.rcpt("bob@example.test")
            return s.data(body)[0]

    signed = sign(message, RSA, "xn--bcher-kva.test", "rsa")
    assert deliver("bounces@elsewhere.test", signed) == 250  # aligned DKIM
    assert deliver("jörg@bücher.test", message) == 250  # aligned SPF, U-label MAIL FROM
    assert deliver("bounces@elsewhere.test", message) == 550  # neither: p=reject
    for m in backend.messages():
        head = m["data"].split(b"\r\n\r\n", 1)[0].decode()
        assert "dmarc=pass" in head and "header.from=xn--bcher-kva.test" in head, head


def test_an_aligned_signature_that_could_not_be_checked_is_a_tempfail_never_a_reject(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """The key lookup of the only aligned signature times out: DMARC cannot know
    whether it would pass, so a p=reject domain's mail is deferred (451), not
    refused for good; a message whose aligned signature did verify is unaffected."""
    gw = gateway_factory(dmarc_config(backend, dns))
    code, msg = send(gw, sign(MSG, RSA, "signed.test", "slow"))
    assert code == 451 and msg.startswith(b"4.7."), (code, msg)
    assert send(gw, sign(MSG, RSA, "signed.test", "rsa"))[0] == 250
    assert len(backend.messages()) == 1


def test_a_dkim_check_over_its_time_budget_defers_instead_of_failing_dmarc(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """The runner gives up on DKIM (check_timeout 0.2 s, the key lookup takes 0.5 s):
    DMARC must not read the missing results as "no signature" and reject."""
    pol = "actions:\n  dmarc.reject: reject\n  dmarc.temperror: tempfail\ncheck_timeout: 0.2\n"
    gw = gateway_factory(dmarc_config(backend, dns), policy=pol)
    code, msg = send(gw, sign(MSG, RSA, "signed.test", "slow"))
    assert code == 451, (code, msg)
    assert backend.messages() == []


def test_an_unknown_arc_chain_counts_only_when_a_trusted_sealer_could_override(
    dns: DnsServer,
) -> None:
    """A trusted sealer's chain could have overridden the failure: without its result
    (the ARC check did not finish, or a seal's key could not be fetched) the failure
    is not certain. Without trusted sealers, or when the chain is an untrusted
    sealer's, ARC changes nothing."""
    from gateway.context import Context
    from gateway.vocab import Stage

    async def symbols(
        sealers: frozenset[str],
        incomplete: frozenset[str] = frozenset(),
        arc: tuple[str | None, str | None] = (None, None),
    ) -> Any:
        check = DmarcCheck(resolver(dns))
        check.trusted_sealers = sealers
        ctx = Context("s", "192.0.2.1", 1, "smtp")
        ctx.wire = MSG
        ctx.facts.incomplete = incomplete
        if arc[0] is not None:
            ctx.facts.arc = ArcFacts(arc[0], arc[1])
        out = check.run(Stage.DATA, ctx)
        return out if isinstance(out, tuple) else await out

    trusted, none = frozenset({"list.test"}), frozenset[str]()
    refused, deferred = ("dmarc.fail", "dmarc.reject"), ("dmarc.temperror",)
    assert asyncio.run(symbols(trusted, incomplete=frozenset({"arc"}))) == deferred
    assert asyncio.run(symbols(none, incomplete=frozenset({"arc"}))) == refused
    assert asyncio.run(symbols(trusted, arc=("temperror", "list.test"))) == deferred
    assert asyncio.run(symbols(trusted, arc=("temperror", None))) == deferred
    assert asyncio.run(symbols(trusted, arc=("temperror", "other.test"))) == refused
    assert asyncio.run(symbols(none, arc=("temperror", "list.test"))) == refused
    assert asyncio.run(symbols(trusted, arc=("fail", "list.test"))) == refused


# i= equal to d= leaves no room for the "@" or "." before the domain; dkimpy's own
# check of it indexes off the front of the value (IndexError), which failed the whole
# check: DMARC then saw no signature at all and a p=reject domain's mail was refused.
I_IS_D = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=signed.test;\r\n"
    b" i=signed.test; s=rsa; h=from; bh=AAAA; b=AAAA\r\n"
)


def test_malformed_signature_is_a_permerror_and_the_good_one_still_passes(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(dmarc_config(backend, dns))
    assert send(gw, I_IS_D + sign(MSG, RSA, "signed.test", "rsa"))[0] == 250
    results = our_results(backend)
    assert sorted(r.result for r in results if r.method == "dkim") == ["pass", "permerror"]
    assert [r.result for r in results if r.method == "dmarc"] == ["pass"]
    [bad] = [s for s in verify(dns, I_IS_D + MSG) if s.result != "pass"]
    assert (bad.result, bad.reason) == (
        "permerror",
        "i= domain is not a subdomain of d= (i=b'signed.test' d=b'signed.test')",
    )
    # The permerror names the signature's domain in the header the backend got.
    [header] = [r for r in results if r.method == "dkim" and r.result == "permerror"]
    assert header.header_d == "signed.test", header


# -- ARC ----------------------------------------------------------------------------
ARC_KEY = rsa_key()


def arc_sealed(message: bytes, sealer: str = "list.test") -> bytes:
    """The message as a mailing list would forward it: its A-R, then an ARC set."""
    import dkim

    with_ar = (
        f"Authentication-Results: {sealer}; spf=pass smtp.mailfrom=signed.test; "
        "dkim=pass header.d=signed.test\r\n"
    ).encode() + message
    headers = dkim.arc_sign(with_ar, b"arc", sealer.encode(), ARC_KEY.private, sealer.encode())
    return b"".join(headers) + with_ar


def _without_field(message: bytes, name: bytes) -> list[bytes]:
    """The message's lines without the header field `name` (and its continuations)."""
    out: list[bytes] = []
    skipping = False
    for line in message.split(b"\r\n")[:-1]:
        if line[:1] not in (b" ", b"\t"):
            skipping = line.lower().startswith(name + b":")
        if not skipping:
            out.append(line)
    return out


def arc_verify(dns: DnsServer, message: bytes) -> Any:
    from gateway.checks.arc import ArcCheck

    async def go() -> Any:
        check = ArcCheck(resolver(dns))
        try:
            return await check.verify(message)
        finally:
            check.close()

    return asyncio.run(go())


def test_arc_chain_pass_fail_none(dns: DnsServer) -> None:
    dns.add({"arc._domainkey.list.test": [("TXT", ARC_KEY.dns)]})
    sealed = arc_sealed(MSG)
    assert arc_verify(dns, sealed)[:2] == ("pass", "list.test")
    status, _sealer, why = arc_verify(dns, sealed.replace(b"See you.", b"See you!"))
    assert status == "fail" and why
    assert arc_verify(dns, MSG)[0] == "none"
    # A set whose seal was removed (RFC 8617 5.2: every instance needs all three).
    unsealed = b"".join(line + b"\r\n" for line in _without_field(sealed, b"arc-seal"))
    status, _sealer, why = arc_verify(dns, unsealed)
    assert status == "fail" and "ncomplete" in why, why
    # The seal's key cannot be fetched now: not a fail, a temporary error.
    dns.add({"arc._domainkey.slow.test": [("TIMEOUT", "")]})
    status, _sealer, why = arc_verify(dns, arc_sealed(MSG, "slow.test"))
    assert (status, why) == ("temperror", "key lookup for arc._domainkey.slow.test: timeout")


def test_arc_chain_that_makes_a_helper_raise_is_broken_not_a_check_error(dns: DnsServer) -> None:
    """bh= of one base64 character and padding passes dkimpy's field validation, then
    makes base64 raise (dkimpy's arc_verify raises too). That is a broken chain, as
    the dkimpy-based check said: a crashed check would be a tempfail for ever."""
    import re

    dns.add({"arc._domainkey.list.test": [("TXT", ARC_KEY.dns)]})
    odd = re.sub(rb"bh=[A-Za-z0-9+/=]+", b"bh=A===", arc_sealed(MSG), count=1)
    status, sealer, why = arc_verify(dns, odd)
    assert (status, sealer) == ("fail", None)
    assert why.startswith("ARC validation error: Invalid base64"), why


def test_arc_on_the_loop_when_keys_are_cached_in_a_thread_when_large(dns: DnsServer) -> None:
    """The first chain waits for its seal's key. After that, a small message's chain
    is validated synchronously: `run` returns the symbols, not an awaitable. A large
    relaxed body (over what the loop may hash) is validated in the check's thread.
    Each path tells a good chain from one whose body changed after sealing."""
    from gateway.checks.arc import ArcCheck
    from gateway.context import Context
    from gateway.vocab import Stage

    dns.add({"arc._domainkey.list.test": [("TXT", ARC_KEY.dns)]})
    big = MSG + (b"x" * 70 + b"\r\n") * 500  # ~36 KB: relaxed, over the loop's share
    # ~290 KB: over OFFLOOP_BYTES, so only the header section is parsed on the loop and
    # the thread parses the whole message for its body.
    huge = MSG + (b"x" * 70 + b"\r\n") * 4000
    assert len(huge) > OFFLOOP_BYTES

    async def go() -> list[tuple[bool, Any]]:
        check = ArcCheck(resolver(dns))
        out: list[tuple[bool, Any]] = []
        try:
            for m in (MSG, big, huge):
                sealed = arc_sealed(m)
                for wire in (sealed, sealed.replace(b"See you.", b"See you!")):
                    ctx = Context("s", "192.0.2.1", 1, "smtp")
                    ctx.wire = wire
                    r = check.run(Stage.DATA, ctx)
                    out.append((isinstance(r, tuple), r if isinstance(r, tuple) else await r))
        finally:
            check.close()
        return out

    assert asyncio.run(go()) == [
        (False, ("arc.pass",)),
        (True, ("arc.fail",)),
        (False, ("arc.pass",)),
        (False, ("arc.fail",)),
        (False, ("arc.pass",)),
        (False, ("arc.fail",)),
    ]


def test_dear_verifications_go_to_the_thread_even_with_keys_cached(dns: DnsServer) -> None:
    """An RSA verification costs with the square of the key size (20 µs at 2048
    bits, 66 at 4096, 243 at 8192): a message that asks for many dear ones would hold
    the loop, so it is verified in the check's thread, keys cached or not. Seven DKIM
    signatures and an ARC chain of eight hops, with 4096-bit keys; the same with
    2048-bit keys stays on the loop. A chain of nine hops goes to the thread anyway:
    each seal hashes every set before it."""
    from gateway.checks.arc import LOOP_SETS, ArcCheck
    from gateway.context import Context
    from gateway.vocab import Stage

    big_key = rsa_key(4096)
    dns.add({"big._domainkey.signed.test": [("TXT", big_key.dns)]})

    def chained(hops: int, key: Any) -> bytes:
        message = MSG
        for n in range(1, hops + 1):
            hop = f"h{n}.{'big' if key is big_key else 'std'}.test"
            dns.add({f"arc._domainkey.{hop}": [("TXT", key.dns)]})
            ar = f"Authentication-Results: {hop}; spf=pass{'; arc=pass' if n > 1 else ''}\r\n"
            message = ar.encode() + message
            sealed = dkim.arc_sign(message, b"arc", hop.encode(), key.private, hop.encode())
            message = b"".join(sealed) + message
        return message

    def signed(key: Any, selector: str) -> bytes:
        message = MSG
        for _ in range(7):
            message = sign(message, key, "signed.test", selector)
        return message

    cases = [
        ("dkim", signed(RSA, "rsa"), True),
        ("dkim", signed(big_key, "big"), False),
        ("arc", chained(LOOP_SETS, ARC_KEY), True),
        ("arc", chained(LOOP_SETS, big_key), False),
        ("arc", chained(LOOP_SETS + 1, ARC_KEY), False),
    ]

    async def go() -> list[tuple[str, bool]]:
        arc, dkim_check = ArcCheck(resolver(dns)), DkimCheck(resolver(dns))
        dkim_check.max_signatures = 7
        out = []
        try:
            for name, wire, _ in cases:
                check = arc if name == "arc" else dkim_check
                for _ in range(2):  # the second time, every key is in the cache
                    ctx = Context("s", "192.0.2.1", 1, "smtp")
                    ctx.wire = wire
                    r = check.run(Stage.DATA, ctx)
                    symbols = r if isinstance(r, tuple) else await r
                    assert symbols == (f"{name}.pass",)
                out.append((name, isinstance(r, tuple)))
        finally:
            arc.close()
            dkim_check.close()
        return out

    assert asyncio.run(go()) == [(name, on_loop) for name, _, on_loop in cases]


@pytest.mark.parametrize("sealer", ["trusted", "untrusted", "unreachable"])
def test_trusted_arc_sealer_overrides_dmarc_reject(
    sealer: str, backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """A trusted sealer's passing chain overrides DMARC's reject; an untrusted one
    does not; a trusted sealer whose key cannot be fetched now leaves the failure
    uncertain, so the message is deferred (451), not refused for good."""
    key = ("TIMEOUT", "") if sealer == "unreachable" else ("TXT", ARC_KEY.dns)
    dns.add({"arc._domainkey.list.test": [key]})
    pol = (
        "actions:\n  dmarc.reject: reject\n  dmarc.temperror: tempfail\n"
        "checks:\n  dmarc:\n    trusted_arc_sealers: "
        + ("[]" if sealer == "untrusted" else "[list.test]")
        + "\n"
    )
    gw = gateway_factory(dmarc_config(backend, dns), policy=pol)
    # Forwarded by the list: From alice@signed.test (p=reject), list's own envelope.
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("list.test")
        s.mail("bounces@list.test")
        s.rcpt("bob@example.test")
        code, _ = s.data(arc_sealed(MSG))
    if sealer == "trusted":
        assert code == 250
        [m] = backend.messages()
        assert b"arc=pass" in m["data"] and b"dmarc=fail" in m["data"]
        assert b"oldest-pass" not in m["data"]  # not computed: never claimed
        # Where the chain came from, for whoever seals next (RFC 8617 6).
        [arc] = [r for r in our_results(backend) if r.method == "arc"]
        assert arc.smtp_remote_ip == "127.0.0.1"
    else:
        assert code == (451 if sealer == "unreachable" else 550)
        assert backend.messages() == []


@pytest.mark.parametrize("mode", ["tag", "redirect"])
def test_dmarc_quarantine_tags_or_redirects(
    mode: str, backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    dns.add({"_dmarc.q.test": [("TXT", "v=DMARC1; p=quarantine")]})
    pol = (
        "actions:\n  dmarc.quarantine: quarantine\n"
        f"quarantine:\n  mode: {mode}\n  recipient: quarantine@example.test\n"
    )
    gw = gateway_factory(dmarc_config(backend, dns), policy=pol)
    msg = MSG.replace(b"alice@signed.test", b"alice@q.test")
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("someone@elsewhere.test")
        s.rcpt("bob@example.test")
        s.rcpt("carol@example.test")
        assert s.data(msg)[0] == 250
    [m] = backend.messages()
    head = m["data"].split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ")
    assert (
        b"X-Gateway-Quarantine: symbols=dmarc.quarantine; original-recipients="
        b"<bob@example.test>, <carol@example.test>"
    ) in head
    if mode == "redirect":
        assert m["rcpt_tos"] == ["quarantine@example.test"]
        assert "RSET" in backend.commands()
    else:
        assert m["rcpt_tos"] == ["bob@example.test", "carol@example.test"]


def test_quarantine_mailbox_refused_is_a_tempfail_never_a_reject(
    backend_factory: Callable[..., Backend], dns: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """Redirection reopens the backend transaction; if the quarantine mailbox is
    refused, the client must retry (451), not bounce mail it was told 250 for."""
    be = backend_factory("--reject-rcpt", "quarantine@example.test")
    dns.add({"_dmarc.q.test": [("TXT", "v=DMARC1; p=quarantine")]})
    pol = (
        "actions:\n  dmarc.quarantine: quarantine\n"
        "quarantine:\n  mode: redirect\n  recipient: quarantine@example.test\n"
    )
    gw = gateway_factory(dmarc_config(be, dns), policy=pol)
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("someone@elsewhere.test")
        assert s.rcpt("bob@example.test")[0] == 250
        code, msg = s.data(MSG.replace(b"alice@signed.test", b"alice@q.test"))
    assert (code, msg[:5]) == (451, b"4.3.0")
    assert be.messages() == []


@settings(max_examples=3000, derandomize=True)
@given(
    st.lists(
        st.sampled_from(
            [
                b"From: a@x.test",
                b"from:b@y.test",
                b"FROM :c@z.test",
                b"From: <d@w.test>,",
                b" e@v.test",
                b"\tfolded",
                b"To: t@x.test",
                b"From a@mbox.test",
                b":nameless",
                b"Subject: hi",
                b"",
                b"From:",
                b'From: "q@t" <f@u.test>',
                b"X: \xc3\xa9",
                b"bare\nlf",
                b"From: g@s.test\r",
            ]
        ),
        max_size=6,
    )
)
def test_from_fields_fast_scan_agrees_with_the_email_parser(lines: list[bytes]) -> None:
    """The plain-header scan returns what the email package's parser does, or
    defers to it; DMARC's idea of the From domain must not depend on which ran."""
    from email import policy as email_policy
    from email.parser import HeaderParser

    from gateway.checks.dmarc import _plain_from_fields
    from gateway.wire import header_section

    head = header_section(b"\r\n".join(lines) + b"\r\n\r\nbody\r\n")
    fast = _plain_from_fields(head)
    text = head.decode("utf-8", "replace")
    parsed = HeaderParser(policy=email_policy.compat32).parsestr(text)
    if fast is not None:
        assert fast == [str(v) for v in parsed.get_all("From") or []]


def test_from_fields_fast_scan_takes_plain_headers() -> None:
    from gateway.checks.dmarc import _plain_from_fields

    assert _plain_from_fields(MSG) == ["Alice <alice@signed.test>"]
    folded = b"From: Alice\r\n <alice@signed.test>\r\nTo: b@x.test\r\n\r\n"
    assert _plain_from_fields(folded) == ["Alice\r\n <alice@signed.test>"]
    assert _plain_from_fields(b"From: \xc3\xa9 <a@b.test>\r\n\r\n") is None  # parser decides


_FROM_PARTS = [
    "Alice", " ", "<", ">", "a", "B", ".", "@", "x.test", "Y-1.Test", ",", '"', "(c)",
    "\t", "=?utf-8?q?x?=", ":", ";", "J. S", "\\", "\r\n ", "-", "_", "+",
]  # fmt: skip


def _plain_from(name: str, local: str, domain: str, bracket: bool) -> str:
    return f"{name}<{local}@{domain}>" if bracket else f"{local}@{domain}"


_from_values = st.one_of(
    st.lists(st.sampled_from(_FROM_PARTS), max_size=10).map("".join),
    # Plain forms, and plain forms with one part spliced in somewhere.
    st.builds(
        _plain_from,
        st.sampled_from(["", "Alice ", "A B ", " ", "J. S ", '"x" ', "a@b "]),
        st.sampled_from(["a", "a.b", "a+b", ".a", "a..b", "a_b-c"]),
        st.sampled_from(["x.test", "X.Test", "x.test.", "x", "-x.test", "x..test"]),
        st.booleans(),
    ).flatmap(
        lambda v: st.tuples(
            st.integers(0, len(v)), st.one_of(st.just(""), st.sampled_from(_FROM_PARTS))
        ).map(lambda t: v[: t[0]] + t[1] + v[t[0] :])
    ),
)


@settings(max_examples=5000, derandomize=True, deadline=None)
@given(_from_values)
def test_plain_from_value_agrees_with_getaddresses(value: str) -> None:
    """The one-pattern reading of a plain From value gives the domains the email
    package's getaddresses gives (the DMARC From domain must not depend on which ran)."""
    from email.utils import getaddresses

    from gateway.checks.dmarc import _PLAIN_FROM, value_domains

    addrs = getaddresses([value])
    want = [a.rpartition("@")[2].strip().lower().rstrip(".") for _, a in addrs if "@" in a]
    assert value_domains(value) == (want if len(want) == len(addrs) else [])
    if _PLAIN_FROM.fullmatch(value) is not None:
        assert len(want) == 1  # the pattern only ever takes a single address


def test_plain_from_value_takes_the_common_forms() -> None:
    from gateway.checks.dmarc import _PLAIN_FROM

    for v in ("Alice <alice@x.test>", "alice@X.Test", " a.b+c@x-1.test ", "<a@x.test>"):
        assert _PLAIN_FROM.fullmatch(v) is not None, v
