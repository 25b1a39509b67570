"""gateway.dns against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway import config
from gateway.dns import DnsStatus, Resolver, parse_nameserver
from tests.support.dnsserver import DnsServer


@pytest.fixture
def server() -> Iterator[DnsServer]:
    s = DnsServer(
        {
            "a.test": [("A", "192.0.2.1"), ("A", "192.0.2.2"), ("TXT", "v=spf1 -all")],
            "mx.test": [("MX", "10 mail.a.test.")],
            "long.test": [("TXT", "x" * 300)],
            "broken.test": [("SERVFAIL", "")],
            "slow.test": [("TIMEOUT", "")],
            "alias.test": [("CNAME", "a.test.")],
        }
    )
    yield s
    s.close()


def resolver(server: DnsServer, **kw: object) -> Resolver:
    return Resolver(config.Dns(nameservers=[server.address], timeout=0.5, **kw))  # type: ignore[arg-type]


def test_answers_statuses_and_forms(server: DnsServer) -> None:
    async def go() -> None:
        r = resolver(server)
        a = await r.query("a.test", "A")
        assert a.status is DnsStatus.OK and sorted(a.records) == ["192.0.2.1", "192.0.2.2"]
        assert a.ttl == 300
        assert (await r.query("a.test", "TXT")).records == ((b"v=spf1 -all",),)
        assert (await r.query("long.test", "TXT")).records == ((b"x" * 255, b"x" * 45),)
        assert (await r.query("mx.test", "MX")).records == ((10, "mail.a.test"),)
        assert (await r.query("a.test", "AAAA")).status is DnsStatus.NODATA
        nx = await r.query("none.test", "A")
        assert nx.status is DnsStatus.NXDOMAIN and not nx.exists and not nx.temporary
        sf = await r.query("broken.test", "A")
        assert sf.status is DnsStatus.SERVFAIL and sf.temporary
        to = await r.query("slow.test", "A")
        assert to.status is DnsStatus.TIMEOUT and to.temporary
        assert (await r.query("alias.test", "A")).records  # CNAME followed

    asyncio.run(go())


def test_a_name_the_dns_cannot_hold_does_not_exist_rather_than_failing(
    server: DnsServer,
) -> None:
    """An empty label (a DKIM or ARC s= left empty), a 64-octet label or a 256-octet
    name: permanently absent, never a temporary error that defers a message forever."""

    async def go() -> None:
        r = resolver(server)
        for name in ("._domainkey.a.test", "a..test", "x" * 64 + ".test", "abcdefg." * 40 + "test"):
            ans = await r.query(name, "TXT")
            assert ans.status is DnsStatus.NXDOMAIN and not ans.temporary, name
        assert server.queries == []  # nothing was sent

    asyncio.run(go())


def test_cache_positive_negative_and_not_failures(server: DnsServer) -> None:
    async def go() -> None:
        r = resolver(server)
        for _ in range(3):
            await r.query("a.test", "A")
            await r.query("none.test", "A")
            await r.query("broken.test", "A")
        assert server.asked("a.test", "A") == 1
        assert server.asked("none.test", "A") == 1  # negative answers are cached
        assert server.asked("broken.test", "A") >= 3  # failures are not
        assert r.peek("A.TEST.", "a") is not None

    asyncio.run(go())


def test_concurrent_asks_share_one_query(server: DnsServer) -> None:
    server.set("delayed.test", [("DELAY", "0.2"), ("A", "192.0.2.9")])

    async def go() -> None:
        r = resolver(server)
        res = await asyncio.gather(*(r.query("delayed.test", "A") for _ in range(20)))
        assert all(x.records == ("192.0.2.9",) for x in res)

    asyncio.run(go())
    assert server.asked("delayed.test", "A") == 1


def test_cache_is_bounded(server: DnsServer) -> None:
    async def go() -> None:
        r = resolver(server, cache_size=10)
        for i in range(30):
            await r.query(f"n{i}.test", "A")
        assert len(r._cache) <= 10

    asyncio.run(go())


def test_parse_nameserver() -> None:
    assert parse_nameserver("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    with pytest.raises(ValueError):
        parse_nameserver("not-an-ip")


def test_a_cancelled_asker_does_not_cancel_others(server: DnsServer) -> None:
    """Shared in-flight queries: one session's deadline must not reach another session."""
    server.set("shared.test", [("DELAY", "0.3"), ("A", "192.0.2.7")])

    async def go() -> None:
        r = resolver(server)
        first = asyncio.ensure_future(r.query("shared.test", "A"))
        second = asyncio.ensure_future(r.query("shared.test", "A"))
        await asyncio.sleep(0.05)
        first.cancel()
        ans = await second
        assert ans.records == ("192.0.2.7",)
        assert first.cancelled()

    asyncio.run(go())
    assert server.asked("shared.test", "A") == 1
