"""Trust boundaries: PROXY headers, forged Authentication-Results, client-sent
XCLIENT/XFORWARD, header injection through addresses and rewriting."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.security.helpers import greeted, send_message
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient, deliver


def test_proxy_header_from_untrusted_peer_closes(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cfg = base_config(backend.url, proxy_networks=["192.0.2.0/24"])
    cfg["listeners"][0]["proxy_protocol"] = True
    gw = gateway_factory(cfg)
    with RawClient(gw.port()) as c:
        c.send(b"PROXY TCP4 192.0.2.77 198.51.100.1 40001 25\r\n")
        # The gateway aborts (RST): EOF or a reset, by timing; never a greeting.
        assert c.closed() and c.buf == b""
    gw.wait_log(lambda e: e.get("event") == "proxy_refused")


def test_proxy_header_on_a_listener_without_proxy_protocol_is_a_command(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, proxy_networks=["127.0.0.0/8"]))
    with greeted(gw.port(), helo=False) as c:
        assert c.cmd("PROXY TCP4 192.0.2.77 198.51.100.1 40001 25")[0] == 500
        c.cmd("EHLO client.test")
        c.cmd("QUIT")
    ev = gw.wait_log(lambda e: e.get("event") == "disconnect")
    assert ev["client"] == "127.0.0.1"


FORGED = [
    b"Authentication-Results: gw.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n",
    b"Authentication-Results:\r\n gw.test;\r\n\tdkim=pass header.d=bank.test\r\n",
    b"AUTHENTICATION-RESULTS: GW.TEST; dmarc=pass header.from=bank.test\r\n",
    b"AuThEnTiCaTiOn-ReSuLtS: Gw.TeSt; dmarc=pass header.from=bank.test\r\n",
    b'Authentication-Results: "gw.test"; spf=pass\r\n',
    b"Authentication-Results: =?utf-8?q?gw.test?=; spf=pass\r\n",
    b"Authentication-Results: (trust me) gw.test. 1; arc=pass\r\n",
    b"Authentication-Results : gw.test; spf=pass\r\n",
]


@pytest.mark.parametrize("forged", FORGED, ids=range(len(FORGED)))
def test_forged_authentication_results_are_removed(
    forged: bytes, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))  # trusted or not: stripped either way
    other = b"Authentication-Results: mx.elsewhere.test; spf=fail\r\n"
    msg = forged + other + b"From: ceo@bank.test\r\nSubject: wire money\r\n\r\nnow\r\n"
    assert deliver(gw.port(), msg)[0] == 250
    [m] = backend.messages()
    head = m["data"].split(b"\r\n\r\n", 1)[0].lower()
    ours = [line for line in head.split(b"\r\n") if line.startswith(b"authentication-results")]
    # Exactly our own header (first) and the other host's, untouched.
    assert len(ours) == 2, head
    assert ours[0].startswith(b"authentication-results: gw.test;")
    assert other.strip().lower() in head


# Written as the client puts them on the wire: a leading dot is removed by every
# backend (RFC 5321 4.5.2), so `.Authentication-Results:` is stored as a field.
IMITATED = [
    b".Authentication-Results: gw.test; dkim=pass header.d=bank.test\r\n",
    b"Authentication-Results: ((((a)))) gw.test; dkim=pass header.d=bank.test\r\n",
    b"Authentication-Results: (a (b) (c (d (e)))) gw.test; spf=pass\r\n",
    b".authentication-results:\r\n\t(x) GW.TEST.;\r\n dmarc=pass\r\n",
    b"ARC-Authentication-Results: i=1; gw.test; dmarc=pass header.from=bank.test\r\n",
    b"Received-SPF: pass (gw.test: domain of bank.test designates 192.0.2.1 as permitted"
    b" sender) receiver=gw.test;\r\n",
    b"X-Gateway-Tag: none\r\n",
    b".X-Gateway-Quarantine: no\r\n",
    b"X-Original-To: ceo@bank.test\r\n",
]


@pytest.mark.parametrize("forged", IMITATED, ids=range(len(IMITATED)))
def test_fields_imitating_ours_are_removed_in_every_spelling(
    forged: bytes, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    other = b"Authentication-Results: mx.elsewhere.test; spf=fail\r\n"
    wire = forged + other + b"From: ceo@bank.test\r\nSubject: wire money\r\n\r\nnow\r\n"
    with greeted(gw.port()) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(wire + b".\r\n")
        assert c.reply()[0] == 250
    [m] = backend.messages()
    head = m["data"].split(b"\r\n\r\n", 1)[0].lower()
    name = forged.lstrip(b".").split(b":", 1)[0].lower()
    if name == b"authentication-results":
        ours = [line for line in head.split(b"\r\n") if line.startswith(name)]
        assert len(ours) == 2, head  # ours (first), and the other host's
        assert ours[0].startswith(b"authentication-results: gw.test;")
    else:
        assert not any(line.startswith(name) for line in head.split(b"\r\n")), head
    assert other.strip().lower() in head
    gw.wait_log(lambda e: e.get("event") == "forged_ar_removed" and e["count"] == 1)


def _data_reply(gw: Gateway, message: bytes) -> tuple[int, str]:
    """The reply to `message` (wire form) in a transaction to x@example.test."""
    with greeted(gw.port()) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(message + b".\r\n")
        return c.reply()


@pytest.mark.parametrize("first", [b" ; dkim=pass header.d=bank.test\r\n", b".\t; dmarc=pass\r\n"])
def test_a_message_that_begins_with_a_continuation_line_is_refused(
    first: bytes, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """Put after the fields the gateway adds, it would continue our own
    Authentication-Results with the client's results."""
    gw = gateway_factory(base_config(backend.url))
    code, text = _data_reply(gw, first + b"From: ceo@bank.test\r\n\r\nnow\r\n")
    assert (code, text[:9]) == (550, "550 5.6.0"), text
    assert backend.messages() == []


def test_dot_stuffed_received_fields_count_toward_the_hop_limit(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, limits={"max_received_headers": 5}))
    hops = b"".join(b".Received: from hop%d by relay.test\r\n" % n for n in range(6))
    code, text = _data_reply(gw, hops + b"Subject: loop\r\n\r\nbody\r\n")
    assert (code, text[:9]) == (554, "554 5.4.6"), text
    assert backend.messages() == []


def test_client_sent_xclient_and_xforward_are_never_honoured(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    be = backend_factory("--xclient")
    gw = gateway_factory(base_config(be.url))
    with greeted(gw.port()) as c:
        assert c.cmd("XCLIENT ADDR=192.0.2.66 NAME=trusted.bank.test")[0] == 502
        assert c.cmd("XFORWARD ADDR=192.0.2.66")[0] == 502
        assert send_message(c) == 250
    [m] = be.messages()
    assert m["xclient"]["ADDR"] == "127.0.0.1"
    assert not any("192.0.2.66" in cmd for cmd in be.commands())


def test_no_header_injection_through_addresses_or_rewriting(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    policy = (
        "rewrite:\n  original_recipient_header: X-Original-To\n"
        "  canonical_recipient:\n    headers: true\n"
        '    rules: {"/^(.*)@old\\\\.test$/": "$1@example.test"}\n'
    )
    gw = gateway_factory(base_config(backend.url, local_domains=["example.test", "old.test"]),
                         policy=policy)  # fmt: skip
    with greeted(gw.port()) as c:
        c.cmd("MAIL FROM:<a@sender.test>")
        # A quoted local part full of header syntax: legal in SMTP, inert in headers.
        # With an @ inside, the rewritten address is a routing trick: refused.
        assert c.cmd('RCPT TO:<"x> Bcc: victim@evil.test"@old.test>')[0] == 550
        assert c.cmd('RCPT TO:<"x>\r Bcc: victim"@old.test>')[0] == 501  # CR: refused
        assert c.cmd('RCPT TO:<"x> Bcc: victim"@old.test>')[0] == 250
        c.cmd("DATA")
        c.send(
            b'To: "Bcc: victim@evil.test" <"x> Bcc: victim"@old.test>,\r\n'
            b" friend@old.test\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
        )
        assert c.reply()[0] == 250
    [m] = backend.messages()
    head = m["data"].split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")
             if line and line[:1] not in (b" ", b"\t")]  # fmt: skip
    assert b"bcc" not in names, head
    assert set(names) <= {b"received", b"authentication-results", b"x-original-to", b"to",
                          b"subject"}, names  # fmt: skip
    assert b"friend@example.test" in head  # the rewrite did happen
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))


HELOS = [
    ("evil.test) by mx.bank.test (", b"evil.test?"),  # the rest of the line is ignored
    ("a)(by.bank.test", b"a??by.bank.test"),
    ('x;dkim=pass"<ceo@bank.test>\\', b"x?dkim=pass??ceo?bank.test??"),
    ("[IPv6:2001:db8::1]", b"[IPv6:2001:db8::1]"),  # an address literal, kept
    ("mx-1.client.test", b"mx-1.client.test"),
]


@pytest.mark.parametrize(("helo", "written"), HELOS, ids=range(len(HELOS)))
def test_a_hostile_helo_is_one_inert_token_in_received(
    helo: str, written: bytes, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """The HELO name goes into the from-domain of our Received field. Characters that
    would close or open a comment, a quoted string or a path there become `?`, as
    Postfix neuters them, so a Received parser downstream reads the fields as we wrote
    them (the name's own parentheses would otherwise pair with ours)."""
    gw = gateway_factory(base_config(backend.url))
    with greeted(gw.port(), helo=False) as c:
        assert c.cmd(f"EHLO {helo}")[0] == 250
        assert send_message(c) == 250
    [m] = backend.messages()
    first = m["data"].split(b"\r\n", 1)[0]
    assert first == b"Received: from " + written + b" ([127.0.0.1])"
