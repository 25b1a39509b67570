"""The DKIM check (gateway/checks/dkim.py): what runs on the loop and what in a
thread, and its verdicts with keys from a dict resolver."""

from __future__ import annotations

import asyncio

import dkim

from gateway.checks.dkim import DkimCheck, DkimOptions
from gateway.dns import DnsAnswer
from tests.support.dkimkeys import rsa_key
from tests.unit.checks.offloop import run_at_data
from tests.unit.checks.signing import MSG, _sign
from tests.unit.fakes import TIMEOUT, DictResolver, txt


def test_work_that_would_hold_the_loop_goes_to_a_thread() -> None:
    from gateway.checks.dkim import on_loop

    assert on_loop(4096, [b"relaxed/simple"])  # the common small message
    assert on_loop(250_000, [b"relaxed/simple"])  # simple body: hashing only
    assert on_loop(21_000, [b"relaxed/relaxed"])
    assert not on_loop(22_000, [b"relaxed/relaxed"])  # relaxed body: up to 11 ns a byte
    assert not on_loop(8192, [b"relaxed/relaxed"] * 3)  # every signature pays again
    assert not on_loop(100_000, [b"simple"] * 3)  # c=simple means simple/simple
    assert on_loop(4096, [])
    # RSA verifications count too, with the square of the key size.
    assert on_loop(4096, [b"relaxed/simple"] * 5, [2048] * 5)
    assert on_loop(4096, [b"relaxed/simple"] * 5, [4096] * 5)
    assert not on_loop(4096, [b"relaxed/simple"] * 2, [8192] * 2)
    assert not on_loop(4096, [b"relaxed/relaxed"], [2048] * 25)  # an ARC chain of 24 hops


def test_relaxed_body_of_a_large_message_verifies_in_the_thread_alike() -> None:
    """A 100 KB relaxed-body message takes the thread path; the verdict is dkimpy's."""

    from gateway import config
    from gateway.checks.dkim import DkimCheck, on_loop
    from gateway.dns import Resolver

    key = rsa_key(1024)
    big = MSG + b"word  \t spaced   \r\n" * 5000
    message = _sign(key, big, canonicalize=(b"relaxed", b"relaxed"))
    assert not on_loop(len(message), [b"relaxed/relaxed"])
    record = key.dns.encode()
    theirs = dkim.DKIM(message).verify(dnsfunc=lambda n, timeout=5: record)

    async def go() -> list[str]:
        # The key is handed over as a cached answer: no DNS server is needed.
        check = DkimCheck(Resolver(config.Dns(nameservers=["127.0.0.1:9"])))
        try:
            out = []
            for m in (message, message.replace(b"word", b"ward", 1)):
                job = check._prepare(m, crlf_clean=True)
                assert not isinstance(job, list)
                for name in list(job.pending):
                    job.keys[name] = record
                job.pending.clear()
                assert not check._on_loop(job)
                [s] = await check._complete(job)
                out.append(s.result)
            return out
        finally:
            check.close()

    assert asyncio.run(go()) == ["pass" if theirs else "fail", "fail"]


def test_header_fields_count_in_the_loop_decision() -> None:
    """Relaxed header canonicalisation costs up to 75 ns a byte: a signature over a
    header section of over 32 KiB, or an ARC chain of long fields, goes to the thread."""
    from gateway.checks.dkim import HEADER_LOOP_BYTES, on_loop

    assert on_loop(4096, [b"relaxed/simple"], [2048], header=10_000)
    assert on_loop(4096, [b"relaxed/simple"], [2048], header=HEADER_LOOP_BYTES)
    assert not on_loop(4096, [b"relaxed/simple"], [2048], header=HEADER_LOOP_BYTES + 1)


def _check(zone: dict[tuple[str, str], DnsAnswer]) -> tuple[DkimCheck, DictResolver]:
    resolver = DictResolver(zone)
    return DkimCheck(resolver), resolver


KEY = rsa_key(1024)
SIGNED = _sign(KEY, MSG)
KEY_NAME = ("s1._domainkey.example.test", "TXT")


def test_a_valid_signature_passes_with_its_result_and_facts() -> None:
    check, resolver = _check({KEY_NAME: txt(KEY.dns)})
    symbols, ctx, at_once = run_at_data(check, SIGNED)
    assert symbols == ("dkim.pass",) and not at_once  # the key was not cached yet
    assert resolver.asked == [KEY_NAME]
    [sig] = ctx.facts.dkim
    assert (sig.domain, sig.selector, sig.algorithm, sig.result) == (
        "example.test",
        "s1",
        "rsa-sha256",
        "pass",
    )
    assert [a.result for a in ctx.auth] == ["pass"]


def test_with_the_key_cached_a_small_message_is_verified_at_once() -> None:
    check, resolver = _check({KEY_NAME: txt(KEY.dns)})
    resolver.known[KEY_NAME] = txt(KEY.dns)
    symbols, _, at_once = run_at_data(check, SIGNED)
    assert symbols == ("dkim.pass",) and at_once and resolver.asked == []


def test_an_altered_body_fails() -> None:
    check, _ = _check({KEY_NAME: txt(KEY.dns)})
    symbols, ctx, _ = run_at_data(check, SIGNED.replace(b"Hello Bob", b"Hello Eve"))
    assert symbols == ("dkim.fail",)
    assert ctx.facts.dkim[0].result == "fail"


def test_a_key_lookup_that_times_out_is_a_temperror_never_a_fail() -> None:
    check, _ = _check({KEY_NAME: TIMEOUT})
    symbols, ctx, _ = run_at_data(check, SIGNED)
    assert symbols == ("dkim.temperror",)
    assert ctx.facts.dkim[0].reason == "key lookup timeout"


def test_no_key_published_is_a_permerror() -> None:
    check, _ = _check({})
    symbols, ctx, _ = run_at_data(check, SIGNED)
    assert symbols == ("dkim.permerror",)
    assert ctx.facts.dkim[0].reason == "no key for signature"


def test_rsa_sha1_is_refused_without_a_lookup() -> None:
    check, resolver = _check({KEY_NAME: txt(KEY.dns)})
    symbols, ctx, _ = run_at_data(check, _sign(KEY, MSG, signature_algorithm=b"rsa-sha1"))
    assert symbols == ("dkim.permerror",) and resolver.asked == []
    assert "RFC 8301" in ctx.facts.dkim[0].reason


def test_an_unsigned_message_is_none_in_the_results() -> None:
    check, _ = _check({})
    symbols, ctx, _ = run_at_data(check, MSG)
    assert symbols == ("dkim.none",) and ctx.facts.dkim == ()
    assert [(a.method, a.result) for a in ctx.auth] == [("dkim", "none")]


def test_signatures_past_the_configured_count_are_not_verified() -> None:
    twice = _sign(KEY, SIGNED)  # a second signature over the signed message
    check, _ = _check({KEY_NAME: txt(KEY.dns)})
    one = check.configured(DkimOptions(max_signatures=1))
    assert one is not check and check.max_signatures == 5
    _, ctx, _ = run_at_data(one, twice)
    assert len(ctx.facts.dkim) == 1
    _, ctx, _ = run_at_data(_check({KEY_NAME: txt(KEY.dns)})[0], twice)
    assert len(ctx.facts.dkim) == 2
