"""Command abuse: each gets the right reply; the session survives or closes as RFC 5321
says; too many errors end it with 421 4.7.0."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.security.helpers import greeted, rss_kb, send_message
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient


@pytest.fixture
def gw(backend: Backend, gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(base_config(backend.url, limits={"max_recipients": 50}))


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        (b"FOO bar", 500, "5.5.2"),  # unknown command
        (b"RCPT TO:<x@example.test>", 503, "5.5.1"),  # before MAIL
        (b"DATA", 503, "5.5.1"),  # before MAIL
        (b"EHLO bad\x01name", 501, "5.5.2"),  # control character
        (b"HELO", 501, "5.5.4"),  # no argument
        (b"AUTH PLAIN AGFAYg==", 502, "5.5.1"),  # never on an inbound MX
        (b"BDAT 10 LAST", 502, "5.5.1"),  # CHUNKING is not advertised
        (b"XCLIENT ADDR=192.0.2.1", 502, "5.5.1"),  # never honoured from a client
        (b"XFORWARD ADDR=192.0.2.1", 502, "5.5.1"),
        (b"EXPN staff", 502, "5.5.1"),
        (b"MAIL FROM:<a@sender.test> SIZE=abc", 501, "5.5.4"),
        (b"MAIL FROM:<a@sender.test> SIZE=10 SIZE=20", 501, "5.5.4"),
        # Digits that Python's str.isdigit() takes and ASCII does not (RFC 1870: DIGIT),
        # and more than the 20 RFC 1870 allows.
        ("MAIL FROM:<a@sender.test> SIZE=²".encode(), 501, "5.5.4"),
        ("MAIL FROM:<a@sender.test> SIZE=1²".encode(), 501, "5.5.4"),
        ("MAIL FROM:<a@sender.test> SIZE=①".encode(), 501, "5.5.4"),
        ("MAIL FROM:<a@sender.test> SIZE=١٢".encode(), 501, "5.5.4"),
        (b"MAIL FROM:<a@sender.test> SIZE=" + b"1" * 21, 501, "5.5.4"),
        (b"MAIL FROM:<a@sender.test> BODY=BINARYMIME", 501, "5.5.4"),
        (b"MAIL FROM:<a@sender.test> RET=ALL", 501, "5.5.4"),  # DSN: FULL or HDRS
        (b"MAIL FROM:<a@sender.test> ENVID=", 501, "5.5.4"),  # xtext of one char at least
        (b"MAIL FROM:<a@sender.test> MT-PRIORITY=3", 555, "5.5.4"),  # not offered
        (b"MAIL TO:<a@sender.test>", 501, "5.5.4"),
        (b"MAIL FROM:a@sender.test", 501, "5.1.7"),
        (b"X" * 5000, 500, "5.5.6"),  # line too long
    ],
)
def test_bad_commands_get_the_right_reply_and_the_session_survives(
    gw: Gateway, backend: Backend, line: bytes, code: int, enhanced: str
) -> None:
    with greeted(gw.port()) as c:
        got, text = c.cmd(line)
        assert (got, text[4:9]) == (code, enhanced), text
        assert c.cmd("NOOP")[0] == 250  # still serving
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert not any("192.0.2.1" in cmd for cmd in backend.commands())


def test_nested_mail_and_sequence_errors(gw: Gateway) -> None:
    with greeted(gw.port(), helo=False) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 503  # before HELO
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("MAIL FROM:<b@sender.test>")[0] == 503  # nested
        assert c.cmd("DATA")[0] == 503  # no recipient yet
        assert c.cmd("STARTTLS")[0] == 502  # not offered on this listener


def test_thousands_of_recipients(gw: Gateway, backend: Backend) -> None:
    with greeted(gw.port()) as c:
        c.cmd("MAIL FROM:<a@sender.test>")
        c.send(b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(3000)))
        codes = [c.reply() for _ in range(3000)]
        assert [x[0] for x in codes[:50]] == [250] * 50
        assert {x[0] for x in codes[50:]} == {452}
        assert all(x[1].startswith("452 4.5.3") for x in codes[50:])
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: many\r\n\r\nx\r\n.\r\n")
        assert c.reply()[0] == 250
    [m] = backend.messages()
    assert len(m["rcpt_tos"]) == 50


def test_noop_and_rset_floods_end_with_421(gw: Gateway) -> None:
    with greeted(gw.port()) as c:
        c.send(b"NOOP\r\nRSET\r\n" * 500)
        replies = []
        while True:
            code, text = c.reply()
            if code in (0, 421):
                replies.append((code, text))
                break
            replies.append((code, text))
        assert all(code == 250 for code, _ in replies[:-1])
        assert replies[-1][0] == 421 and replies[-1][1].startswith("421 4.7.0")
        # 100 junk commands are free (the EHLO of greeted() was the first), then 20
        # more count as errors.
        assert len(replies) - 1 == 99 + 20
        assert c.closed()


def test_a_completed_transaction_resets_the_junk_count(gw: Gateway) -> None:
    with greeted(gw.port()) as c:
        for _ in range(3):
            for _ in range(90):
                assert c.cmd("NOOP")[0] == 250
            assert send_message(c) == 250


def test_too_many_errors_close_with_421(gw: Gateway) -> None:
    with greeted(gw.port()) as c:
        for _ in range(19):
            assert c.cmd("BOGUS")[0] == 500
        assert c.cmd("BOGUS")[0] == 500
        assert c.reply()[1].startswith("421 4.7.0")
        assert c.closed()


def test_pipelining_without_reading_replies_is_held_back(gw: Gateway) -> None:
    """A client that pipelines recipients and never reads: the gateway stops reading
    when its replies back up, so its memory stays bounded; the client reading late
    still gets every reply in order."""
    pid = gw.proc.pid
    before = rss_kb(pid)
    c = RawClient(gw.port(), connect=False, timeout=60)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    c.sock.connect(("127.0.0.1", gw.port()))
    with c:
        assert c.reply()[0] == 220
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        n, sent = 60, 0  # 16 MB of commands, more in replies (452 4.5.3 beyond 50)
        c.sock.settimeout(3)
        try:
            while sent < n:
                c.sock.sendall(
                    b"".join(b"RCPT TO:<%d@example.test>\r\n" % (sent * 10_000 + i)
                             for i in range(10_000))
                )  # fmt: skip
                sent += 1
        except TimeoutError:
            pass  # the gateway stopped reading: back-pressure reached us
        assert sent < n, "the gateway kept reading with nobody reading its replies"
        assert rss_kb(pid) - before < 20_000
        c.sock.settimeout(60)
        got = [c.reply()[0] for _ in range(60)]
        assert got == [250] * 50 + [452] * 10
