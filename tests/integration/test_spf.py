"""SPF through real SMTP sessions, with a real DNS server on loopback."""

from __future__ import annotations

import smtplib
import threading
from collections.abc import Callable
from typing import Any

import authres
import pytest

from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient

MSG = b"From: a@pass.test\r\nSubject: spf\r\n\r\nhello\r\n"

ZONE = {
    "pass.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "fail.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "soft.test": [("TXT", "v=spf1 ~all")],
    "broken.test": [("SERVFAIL", "")],
    "slowdns.test": [("TIMEOUT", "")],
    "slow.test": [("DELAY", "0.6"), ("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
}


def spf_config(
    backend: Backend,
    dns: DnsServer,
    policy: str = "strict",
    dns_timeout: float = 0.5,
    **over: object,
) -> dict:
    return base_config(
        backend.url,
        trusted_networks=[],
        policy=policy,
        dns={"nameservers": [dns.address], "timeout": dns_timeout},
        **over,
    )


def test_spf_fail_rejected_with_5723_and_nothing_delivered(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    dns_server.add(ZONE)
    gw = gateway_factory(spf_config(backend, dns_server))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        code, msg = s.mail("a@fail.test")
        assert (code, msg) == (550, b"5.7.23 SPF validation failed")
        assert s.rcpt("x@example.test")[0] == 503
    assert backend.messages() == [] and not any(c.startswith("MAIL") for c in backend.commands())


def test_spf_pass_delivered_with_our_authentication_results(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    dns_server.add(ZONE)
    gw = gateway_factory(spf_config(backend, dns_server, authserv_id="mx.gw.test"))
    forged = (
        b"Authentication-Results: MX.GW.TEST (forged);\r\n\tspf=pass smtp.mailfrom=x\r\n"
        b"Authentication-Results: other.example; spf=fail smtp.mailfrom=y\r\n"
    )
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        assert s.mail("a@pass.test")[0] == 250
        s.rcpt("x@example.test")
        assert s.data(forged + MSG)[0] == 250
    [m] = backend.messages()
    head = m["data"].split(b"\r\n\r\n", 1)[0].decode()
    ars = [
        h
        for h in head.replace("\r\n\t", " ").split("\r\n")
        if h.lower().startswith("authentication-results:")
    ]
    # Ours is first, the forged one claiming our id is gone, the other one stays.
    assert len(ars) == 2
    ours = authres.AuthenticationResultsHeader.parse(ars[0])
    assert ours.authserv_id == "mx.gw.test"
    [spf] = [r for r in ours.results if r.method == "spf"]
    assert spf.result == "pass" and spf.smtp_mailfrom == "pass.test"
    assert "other.example" in ars[1]
    assert m["data"].endswith(MSG)


def test_spf_softfail_tagged_by_default_policy(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    dns_server.add(ZONE)
    gw = gateway_factory(spf_config(backend, dns_server, policy="default"))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        assert s.mail("a@soft.test")[0] == 250
        s.rcpt("x@example.test")
        assert s.data(MSG)[0] == 250
    [m] = backend.messages()
    assert b"X-Gateway-Tag: spf.softfail\r\n" in m["data"]
    assert b"spf=softfail" in m["data"]


def test_dns_failure_is_never_a_pass(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    dns_server.add(ZONE)
    gw = gateway_factory(spf_config(backend, dns_server, policy="default"))
    for domain in ("broken.test", "slowdns.test"):
        with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as s:
            s.ehlo("client.test")
            code, msg = s.mail(f"a@{domain}")
            assert (code, msg) == (451, b"4.7.24 SPF validation error, try again"), domain
    assert backend.messages() == []


def test_a_refused_mail_does_not_reset_the_junk_count(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """Only a delivered transaction resets the count of NOOPs and the like: a MAIL
    refused with 451 (a sender whose DNS fails) must not, or a client interleaving
    such MAILs holds its slot with junk for ever."""
    dns_server.add(ZONE)
    gw = gateway_factory(spf_config(backend, dns_server, policy="default"))
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        c.cmd("EHLO client.test")  # the first junk command
        codes: list[int] = []
        for n in range(200):
            codes.append(c.cmd("MAIL FROM:<a@broken.test>" if n % 30 == 29 else "NOOP")[0])
            if codes[-1] == 421:
                break
        # 100 free, then each an error; 20 errors end the session (the 451s in between
        # did not start the count again).
        assert codes[-1] == 421 and 451 in codes, codes


def test_null_sender_checks_helo(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    dns_server.add({"mta.fail.test": [("TXT", "v=spf1 -all")]})
    gw = gateway_factory(spf_config(backend, dns_server))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("mta.fail.test")
        assert s.mail("<>")[0] == 550
    assert dns_server.asked("mta.fail.test", "TXT") == 1


def test_a_single_label_domain_is_none_not_its_tlds_record(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """RFC 7208 4.3: not a multi-label domain, so "none", for MAIL FROM and HELO alike;
    the record a top-level name publishes says nothing about a sender."""
    dns_server.add({"tld": [("TXT", "v=spf1 -all")]})
    gw = gateway_factory(spf_config(backend, dns_server))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("tld")
        assert s.mail("<>")[0] == 250
        s.rset()
        assert s.mail("a@tld")[0] == 250
    assert dns_server.asked("tld") == 0


def test_trusted_clients_skip_spf(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    dns_server.add(ZONE)
    cfg = spf_config(backend, dns_server)
    cfg["trusted_networks"] = ["127.0.0.0/8"]
    gw = gateway_factory(cfg)
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        assert s.mail("a@fail.test")[0] == 250
    assert dns_server.asked("fail.test") == 0


def test_verdict_cache_spares_dns_on_repeat_senders(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    dns_server.add(ZONE)
    gw = gateway_factory(spf_config(backend, dns_server))
    for _ in range(5):
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.ehlo("client.test")
            assert s.mail("a@pass.test")[0] == 250
    assert dns_server.asked("pass.test", "TXT") == 1


def test_slow_dns_does_not_stall_other_sessions(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """One session waits 600 ms on DNS; another completes a whole message meanwhile."""
    dns_server.add(ZONE)
    gw = gateway_factory(spf_config(backend, dns_server, dns_timeout=3))
    slow = RawClient(gw.port())
    try:
        slow.reply()
        slow.cmd("EHLO slow.client.test")
        slow.send(b"MAIL FROM:<a@slow.test>\r\n")
        fast_done = threading.Event()
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.ehlo("fast.client.test")
            s.mail("a@pass.test")
            s.rcpt("x@example.test")
            assert s.data(MSG)[0] == 250
            fast_done.set()
        # The slow session's answer comes only now, after the fast message was delivered.
        code, _ = slow.reply()
        assert code == 250 and fast_done.is_set()
    finally:
        slow.close()
    events = [e for e in gw.events() if e.get("event") == "transaction"]
    assert events and events[0]["outcome"] == "delivered"


def test_dns_answers_pyspf_takes_from_the_cache_count_as_hits(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> None:
    """An answer pyspf finds in the DNS cache counts as a cache hit, whether pyspf
    runs in a worker thread (the first time: the loop counts for it, as it owns the
    metrics) or on the loop (the next two, all answers cached)."""
    dns_server.add(ZONE)
    gw = gateway_factory(spf_config(backend, dns_server))
    hit = 'smtp_gateway_dns_cache_total{result="hit"}'
    before = gw.metric(hit)
    for n in range(3):  # a new HELO each time: no verdict cached, pyspf evaluates again
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.ehlo(f"client{n}.test")
            assert s.mail("a@pass.test")[0] == 250
    assert dns_server.asked("pass.test", "TXT") == 1
    assert gw.metric(hit) - before == 2


def test_pyspf_runs_on_the_loop_when_the_dns_cache_holds_every_answer(
    dns_server: DnsServer,
) -> None:
    """`run` answers at once (no awaitable) when the DNS cache holds every answer,
    and otherwise fetches what the evaluation lacked and runs pyspf again: the exp=
    lookup included, whose failure pyspf itself swallows (its explanation must be
    the sender's, not pyspf's default). A lookup that cannot finish in the check's
    timeout makes a temperror."""
    import asyncio

    from gateway import config
    from gateway.address import parse_path
    from gateway.checks.spf import SpfCheck
    from gateway.context import Context
    from gateway.dns import Resolver
    from gateway.vocab import Stage

    dns_server.add(
        {
            "outer.test": [("TXT", "v=spf1 include:inner.test -all exp=why.outer.test")],
            "inner.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
            "why.outer.test": [("TXT", "%{i} is not a server of %{d}")],
            "slow.test": ZONE["slow.test"],
        }
    )

    async def go() -> list[tuple[bool, str, str]]:
        resolver = Resolver(config.Dns(nameservers=[dns_server.address], timeout=0.5))
        check = SpfCheck(resolver)
        check.cache_ttl = 0  # no verdict cache: every call evaluates
        out = []

        async def spf(ip: str) -> None:
            ctx = Context("s", ip, 25000, "smtp", helo="client.test")
            ctx.mail_from = parse_path("<a@outer.test>")
            r = check.run(Stage.MAIL, ctx)
            on_loop = isinstance(r, tuple)
            symbols = r if isinstance(r, tuple) else await r
            out.append((on_loop, symbols[0], ctx.auth[-1].reason))

        # Only the two records cached, not the explanation: the loop's attempt
        # misses it, and the thread must give the sender's own explanation.
        await resolver.query("outer.test", "TXT")
        await resolver.query("inner.test", "TXT")
        await spf("198.51.100.1")
        await spf("192.0.2.7")  # everything cached now
        await spf("198.51.100.2")
        check.budget = 0.2  # slow.test's answer takes 0.6 s
        out.append((False, *await check.evaluate("192.0.2.1", "a@slow.test", "client.test")))
        return out

    first, second, third, slow = asyncio.run(go())
    assert first == (False, "spf.fail", "198.51.100.1 is not a server of outer.test")
    assert second[:2] == (True, "spf.pass")
    assert third == (True, "spf.fail", "198.51.100.2 is not a server of outer.test")
    assert dns_server.asked("why.outer.test", "TXT") == 1
    assert slow == (False, "temperror", "SPF evaluation incomplete after 0.2 s")


def test_an_evaluation_that_keeps_needing_answers_ends_as_permerror(
    dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pass of pyspf stops at the first answer it lacks; the number of passes is
    bounded (a chain of includes needs one per link)."""
    import asyncio

    from gateway import config
    from gateway.checks import spf
    from gateway.dns import Resolver

    dns_server.add(
        {
            "chain0.test": [("TXT", "v=spf1 include:chain1.test -all")],
            "chain1.test": [("TXT", "v=spf1 include:chain2.test -all")],
            "chain2.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        }
    )

    async def go(passes: int) -> tuple[str, str]:
        monkeypatch.setattr(spf, "MAX_PASSES", passes)
        check = spf.SpfCheck(Resolver(config.Dns(nameservers=[dns_server.address])))
        return await check.evaluate("192.0.2.1", "a@chain0.test", "client.test")

    assert asyncio.run(go(3))[0] == "pass"  # three answers to fetch: three passes after the first
    assert asyncio.run(go(2)) == ("permerror", "SPF evaluation needs over 2 rounds of DNS")


def test_a_ptr_name_whose_a_lookup_fails_is_skipped_not_a_temperror(
    dns_server: DnsServer,
) -> None:
    """RFC 7208 5.5: a DNS error on the A lookup of a PTR name skips that name. The
    first PTR name's CNAME chain loops (served as an authoritative BIND serves it:
    the whole chain, no error), which the resolver cannot follow to an end; the
    second name validates, so `ptr` matches. A DNS error on the PTR lookup itself
    makes the mechanism match nothing: the record's `-all` decides."""
    import asyncio

    from gateway import config
    from gateway.checks.spf import SpfCheck
    from gateway.dns import DnsStatus, Resolver

    dns_server.add(
        {
            "ptr.test": [("TXT", "v=spf1 ptr -all")],
            "7.2.0.192.in-addr.arpa": [("PTR", "loop1.ptr.test."), ("PTR", "mail.ptr.test.")],
            "loop1.ptr.test": [("CNAME", "loop2.ptr.test.")],
            "loop2.ptr.test": [("CNAME", "loop3.ptr.test.")],
            "loop3.ptr.test": [("CNAME", "loop1.ptr.test.")],
            "mail.ptr.test": [("A", "192.0.2.7")],
            "8.2.0.192.in-addr.arpa": [("SERVFAIL", "")],
            "chain.ptr.test": [("CNAME", "c2.ptr.test.")],
            "c2.ptr.test": [("CNAME", "mail.ptr.test.")],
        }
    )

    async def go() -> tuple[Any, ...]:
        resolver = Resolver(config.Dns(nameservers=[dns_server.address], timeout=0.5))
        check = SpfCheck(resolver)
        loop = await resolver.query("loop1.ptr.test", "A")
        chain = await resolver.query("chain.ptr.test", "A")
        return (
            loop.status,
            chain.records,
            await check.evaluate("192.0.2.7", "a@ptr.test", "client.test"),
            await check.evaluate("192.0.2.8", "a@ptr.test", "client.test"),
        )

    loop, chain, matched, no_ptr = asyncio.run(go())
    assert loop is DnsStatus.SERVFAIL  # dnspython: "CNAME chain too long"
    assert chain == ("192.0.2.7",)  # two links in one answer, then the address
    assert matched[0] == "pass"
    assert no_ptr[0] == "fail"


def test_spf_records_are_bounded_in_terms(dns_server: DnsServer) -> None:
    """Terms that need no DNS (ip4:, ip6:) are not bounded by the 10-lookup limit,
    and pyspf parses them on the event loop: a record of more than 250 terms, or
    records of more than 1,000 in all, make the evaluation a permerror."""
    import asyncio

    from gateway import config
    from gateway.checks.spf import SpfCheck
    from gateway.dns import Resolver

    def terms(n: int, base: int) -> str:
        return " ".join(f"ip4:10.{base}.{i // 250}.{i % 250}" for i in range(n))

    dns_server.add(
        {
            "ok.test": [("TXT", f"v=spf1 {terms(248, 1)} ip4:192.0.2.0/24 -all")],
            "big.test": [("TXT", f"v=spf1 {terms(251, 1)} -all")],
            "long.test": [("TXT", "v=spf1 a:x." + "a" * 8000 + " -all")],
            "wide.test": [
                ("TXT", "v=spf1 " + " ".join(f"include:w{n}.test" for n in range(5)) + " -all")
            ],
            **{f"w{n}.test": [("TXT", f"v=spf1 {terms(240, n)} ?all")] for n in range(5)},
        }
    )

    async def go() -> list[tuple[str, str]]:
        check = SpfCheck(Resolver(config.Dns(nameservers=[dns_server.address], timeout=0.5)))
        return [
            await check.evaluate("192.0.2.1", f"a@{d}", "client.test")
            for d in ("ok.test", "big.test", "wide.test", "long.test")
        ]

    ok, big, wide, long = asyncio.run(go())
    assert long == (
        "permerror",
        "SPF Permanent Error: SPF record of long.test has a term over 512 characters",
    )
    assert ok[0] == "pass"  # 250 terms, the last ip4 matches
    assert big == (
        "permerror",
        "SPF Permanent Error: SPF record of big.test has 252 terms (at most 250)",
    )
    assert wide == ("permerror", "SPF Permanent Error: SPF records hold over 1000 terms in all")
