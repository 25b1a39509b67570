"""One client session's backend session (gateway/forward/link.py): bound to that
client, told who it is once (XCLIENT), never carried into another identity; what
travels in XCLIENT/XFORWARD is bounded as Postfix bounds it. A scripted backend
(tests/unit/forward/scripted.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway import config
from gateway.forward.backend import Target
from gateway.forward.client import BackendLost, BackendRefusedClient
from gateway.forward.link import ClientInfo, ClientLink, address_literal, client_attrs, ehlo_name
from tests.unit.forward.scripted import Session, scripted

INFO = ClientInfo("192.0.2.7", 4000, "client.test", True, False)
XCLIENT = {"PIPELINING": "", "XCLIENT": "ADDR PORT NAME PROTO HELO"}


def target(xclient: bool = True) -> Target:
    cfg = config.Backend(url=["smtp://127.0.0.1:1"], xclient=xclient)
    return Target(cfg.url[0], cfg, "gw.test")


@pytest.mark.parametrize(
    ("helo", "addr", "name"),
    [
        ("client.test", "192.0.2.7", "client.test"),
        (None, "192.0.2.7", "[192.0.2.7]"),
        ("two words", "192.0.2.7", "[192.0.2.7]"),
        ("caf\u00e9.test", "2001:db8::1", "[IPv6:2001:db8::1]"),
        ("x" * 256, "192.0.2.7", "[192.0.2.7]"),
        ("x" * 255, "192.0.2.7", "x" * 255),
        ("ctl\x01.test", "192.0.2.7", "[192.0.2.7]"),
    ],
)
def test_the_ehlo_for_a_client_is_its_own_name_or_its_address_literal(
    helo: str | None, addr: str, name: str
) -> None:
    assert ehlo_name(ClientInfo(addr, 1, helo, True, False)) == name


def test_xclient_attributes_name_the_client_and_never_our_name() -> None:
    assert client_attrs(INFO) == {
        "ADDR": "192.0.2.7",
        "PORT": "4000",
        "NAME": "[UNAVAILABLE]",
        "PROTO": "ESMTP",
        "HELO": "client.test",
    }
    v6 = client_attrs(ClientInfo("2001:db8::1", 25, None, False, False))
    assert v6["ADDR"] == "IPV6:2001:db8::1" and v6["PROTO"] == "SMTP" and "HELO" not in v6
    assert address_literal("2001:db8::1") == "[IPv6:2001:db8::1]"


def test_a_client_keeps_its_session_which_is_told_who_it_is_once() -> None:
    t = target()
    pool = scripted(t, lambda n: Session(n, XCLIENT))
    link = ClientLink()

    async def go() -> list[bool]:
        _, reused1 = await link.session_for(t, INFO)
        _, reused2 = await link.session_for(t, INFO)
        return [reused1, reused2]

    assert asyncio.run(go()) == [False, True]
    [s] = pool.made
    assert s.said == [
        "XCLIENT ADDR=192.0.2.7 PORT=4000 NAME=[UNAVAILABLE] PROTO=ESMTP HELO=client.test",
        "EHLO client.test",
    ]
    assert link.identified


def test_a_client_that_greets_again_gets_a_new_session_and_the_old_one_quits() -> None:
    t = target()
    pool = scripted(t, lambda n: Session(n, XCLIENT))
    link = ClientLink()

    async def go() -> None:
        await link.session_for(t, INFO)
        await link.session_for(t, ClientInfo("192.0.2.7", 4000, "other.test", True, False))

    asyncio.run(go())
    first, second = pool.made
    assert first.said[-1] == "QUIT" and first.closed
    assert second.said[-1] == "EHLO other.test" and link.session is second  # type: ignore[comparison-overlap]
    asyncio.run(link.end())
    assert second.closed and link.session is None


def test_a_spare_lost_at_xclient_is_replaced_by_a_fresh_session_once() -> None:
    t = target()
    stale = Session(99, XCLIENT, {"XCLIENT": BackendLost("gone")})
    pool = scripted(t, lambda n: Session(n, XCLIENT), spares=[stale])
    link = ClientLink()
    session, reused = asyncio.run(link.session_for(t, INFO))
    assert stale.closed and pool.asked == [False, True]
    assert session is pool.made[0] and not reused  # type: ignore[comparison-overlap]


def test_a_refused_identity_closes_the_session_and_binds_nothing() -> None:
    t = target()
    pool = scripted(t, lambda n: Session(n, XCLIENT, {"XCLIENT": BackendRefusedClient("no")}))
    link = ClientLink()
    with pytest.raises(BackendRefusedClient):
        asyncio.run(link.session_for(t, INFO))
    assert pool.made[0].closed and link.session is None and not link.identified


def test_without_xclient_offered_or_configured_nothing_is_claimed() -> None:
    for t, ext in ((target(), {"PIPELINING": ""}), (target(xclient=False), XCLIENT)):
        pool = scripted(t, lambda n, ext=ext: Session(n, ext))  # type: ignore[misc]
        link = ClientLink()
        asyncio.run(link.session_for(t, INFO))
        assert pool.made[0].said == [] and not link.identified
