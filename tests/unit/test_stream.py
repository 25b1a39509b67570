"""The byte stream and DATA rules, fed directly (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from gateway import replies
from gateway.config import BareLinefeed
from gateway.dsn import xtext
from gateway.smtp.data import DataRefused, check_wire, read_message
from gateway.smtp.memory import MessageMemory, Reservation
from gateway.smtp.protocol import Receiver
from gateway.smtp.proxy import V2_SIGNATURE, ProxyError, read_header
from gateway.stream import LineTooLong, Stream, StreamClosed
from gateway.vocab import Action
from gateway.wire import stuff, unstuff


def fed(*chunks: bytes, eof: bool = True) -> Stream:
    s = Stream()
    for c in chunks:
        s.data_received(c)
    if eof:
        s.eof_received()
    return s


def room(limit: int = 1 << 30) -> Reservation:
    return Reservation(MessageMemory(limit))


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_readline_only_crlf_ends_a_line() -> None:
    s = fed(b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\r\nNOOP\r\n")
    assert run(s.readline(100)) == b"MAIL FROM:<a@b>\nRCPT TO:<c@d>"
    assert run(s.readline(100)) == b"NOOP"
    with pytest.raises(StreamClosed):
        run(s.readline(100))


def test_readline_too_long_discards_to_next_line() -> None:
    s = fed(b"x" * 300 + b"\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        run(s.readline(100))
    assert run(s.readline(100)) == b"NOOP"


def test_read_message_in_chunks_split_across_marker() -> None:
    async def go() -> bytes:
        s = Stream()
        task = asyncio.create_task(
            read_message(s, Receiver(s.buffer), 10_000, BareLinefeed.REJECT, room())
        )
        for chunk in (b"Subject: x\r\n\r\nline1\r\n..dot\r", b"\n.", b"\r", b"\nNOOP\r\n"):
            await asyncio.sleep(0)
            s.data_received(chunk)
        body = await task
        assert await s.readline(100) == b"NOOP"
        return body

    wire = run(go())
    assert wire == b"Subject: x\r\n\r\nline1\r\n..dot\r\n"
    assert unstuff(wire) == b"Subject: x\r\n\r\nline1\r\n.dot\r\n"


def message_of(s: Stream, max_size: int = 100) -> bytes:
    return run(read_message(s, Receiver(s.buffer), max_size, BareLinefeed.REJECT, room()))


def test_empty_message_and_leading_dot() -> None:
    assert message_of(fed(b".\r\n")) == b""
    assert message_of(fed(b"..x\r\n.\r\n")) == b"..x\r\n"


def test_oversize_is_drained_and_refused_with_session_in_sync() -> None:
    s = fed(b"a" * 500 + b"\r\n" + b"b" * 500 + b"\r\n.\r\nNOOP\r\n")
    with pytest.raises(DataRefused) as ei:
        run(read_message(s, Receiver(s.buffer), 600, BareLinefeed.REJECT, room()))
    assert ei.value.reply is replies.SIZE_EXCEEDED
    assert run(s.readline(100)) == b"NOOP"


@pytest.mark.parametrize("seq", [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r\n.\n", b"\ra"])
def test_bare_cr_lf_rejected_or_normalized(seq: bytes) -> None:
    raw = b"Subject: x\r\n\r\nbody" + seq + b"MAIL FROM:<e@x>\r\n"
    with pytest.raises(DataRefused) as ei:
        check_wire(raw, BareLinefeed.REJECT)
    assert ei.value.reply is replies.BARE_LF
    out = check_wire(raw, BareLinefeed.NORMALIZE)
    assert out.count(b"\n") == out.count(b"\r\n") == out.count(b"\r")
    # Whatever became a lone "." line is stuffed: no end-of-data inside the relay.
    assert b"\r\n.\r\n" not in out


def test_nul_refused_long_lines_relayed() -> None:
    with pytest.raises(DataRefused) as ei:
        check_wire(b"a\x00b\r\n", BareLinefeed.NORMALIZE)
    assert ei.value.reply is replies.NUL_IN_DATA
    long = b"x" * 5000 + b"\r\n"
    assert check_wire(long, BareLinefeed.REJECT) == long


def test_stuff_and_unstuff_are_inverse() -> None:
    content = b".a\r\nb\r\n.\r\n..c\r\n"
    assert stuff(content) == b"..a\r\nb\r\n..\r\n...c\r\n"
    assert unstuff(stuff(content)) == content
    assert stuff(b"no newline") == b"no newline\r\n"
    assert stuff(b"") == b""


def test_xtext() -> None:
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"


def test_proxy_v1_and_errors() -> None:
    info = run(read_header(fed(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n")))
    assert (info.src_addr, info.src_port) == ("2001:db8::1", 1)
    assert run(read_header(fed(b"PROXY UNKNOWN\r\n"))).src_addr is None
    for bad in (
        b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n",
        b"HELO x\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 99999\r\n",
    ):
        with pytest.raises((ProxyError, StreamClosed)):
            run(read_header(fed(bad)))


@pytest.mark.parametrize(
    "bad",
    [
        "PROXY TCP4 192.0.2.1 192.0.2.2 +25 25\r\n",  # int() takes a sign,
        "PROXY TCP4 192.0.2.1 192.0.2.2 2_5 25\r\n",  # an underscore,
        "PROXY TCP4 192.0.2.1 192.0.2.2 \u0662\u0665 25\r\n",  # other digits
        "PROXY TCP4 192.0.2.1 192.0.2.2 025 25\r\n",  # leading zero (HAProxy writes none)
        "PROXY TCP6 fe80::1%eth0 2001:db8::2 1 25\r\n",  # a zone: no address to log or pass on
        "PROXY TCP6 2001:db8::1 fe80::2%1 1 25\r\n",
        "PROXY TCP4 0.0.0.0 192.0.2.2 1 25\r\n",  # no TCP client has these sources
        "PROXY TCP4 255.255.255.255 192.0.2.2 1 25\r\n",
        "PROXY TCP4 224.0.0.1 192.0.2.2 1 25\r\n",
        "PROXY TCP6 :: 2001:db8::2 1 25\r\n",
        "PROXY TCP6 ::1.2.3.4 2001:db8::2 1 25\r\n",  # IPv4-compatible (deprecated)
        "PROXY TCP4 192.0.2.1 192.0.2.2 0 25\r\n",  # port 0
    ],
)
def test_proxy_v1_numbers_and_addresses_are_exactly_what_haproxy_writes(bad: str) -> None:
    with pytest.raises(ProxyError):
        run(read_header(fed(bad.encode())))


def test_reply_wire_format() -> None:
    assert replies.SIZE_EXCEEDED.wire() == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    )
    multi = replies.Reply(250, "2.0.0", "a\nb")
    assert multi.wire() == b"250-2.0.0 a\r\n250 2.0.0 b\r\n"
    assert replies.SIZE_EXCEEDED.reason == "size_exceeded"
    r = replies.for_action(Action.REJECT, "relay.denied")
    assert (r.code, r.enhanced, r.reason) == (550, "5.7.1", "relay.denied")


def test_partial_refusal_names_five_refused_recipients_in_safe_lines() -> None:
    refused = [(f"u{i}@example.test", f"550 5.1.1 gone\x1b[{i}m" + "x" * 500) for i in range(7)]
    r = replies.partial_refusal(3, refused)
    assert (r.code, r.enhanced, r.reason) == (554, "5.3.0", "backend_partial_refused")
    lines = r.wire().split(b"\r\n")[:-1]
    assert lines[0] == b"554-5.3.0 Delivered to 3 of 10 recipients; the next hop refused:"
    for i, line in enumerate(lines[1:6]):
        assert line.startswith(b"554-5.3.0 <u%d@example.test> 550 5.1.1 gone?[" % i)
    assert all(len(x) <= 512 and x.isascii() and b"\x1b" not in x for x in lines)
    assert lines[6] == b"554 5.3.0 and 2 more"


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"a\r\nb\r\n", False),
        (b"", False),
        (b"a", False),
        (b"\r\n\r\n", False),
        (b"a\nb\r\n", True),
        (b"a\rb\r\n", True),
        (b"a\r\r\n", True),
        (b"a\n\r", True),
        (b"\r", True),
        (b"\n", True),
        (b"a\r\nb", False),
        (b"x\ry\nz\r\n", True),
    ],
)
def test_has_bare_cr_lf(data: bytes, bare: bool) -> None:
    from gateway.wire import has_bare_cr_lf

    assert has_bare_cr_lf(data) is bare


def test_read_deadline_fires_never_early_and_at_most_a_grain_late() -> None:
    async def go() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        s = Stream(loop=loop)
        s.set_deadline(0.4)
        start = loop.time()
        with pytest.raises(TimeoutError):
            await s.readline(100)
        return start, loop.time()

    start, end = run(go())
    assert 0.4 <= end - start < 0.4 + 0.4 / 8 + 0.25  # grain 0.05 s, plus scheduling slack


def test_read_deadline_shared_timer_follows_every_new_deadline() -> None:
    """Lines that arrive in time are read; a deadline moved later while a read
    waits does not fire at the old time; one moved earlier fires at the new one."""

    async def go() -> list[str]:
        loop = asyncio.get_running_loop()
        s = Stream(loop=loop)
        events = []
        s.set_deadline(5)
        loop.call_later(0.05, s.data_received, b"A\r\n")
        events.append((await s.readline(100)).decode())
        s.set_deadline(0.2)
        loop.call_later(0.1, s.set_deadline, 5)  # later, during the wait
        loop.call_later(0.4, s.data_received, b"B\r\n")  # after the first deadline
        events.append((await s.readline(100)).decode())
        s.set_deadline(30)
        loop.call_later(0.05, s.set_deadline, 0.2)  # earlier, during the wait
        start = loop.time()
        try:
            await s.readline(100)
        except TimeoutError:
            elapsed = loop.time() - start
            # due 0.05 + 0.2 s after start; one grain (0.025 s) late at most, plus slack
            events.append("timeout" if 0.25 <= elapsed < 0.25 + 0.025 + 0.25 else str(elapsed))
        s.connection_lost(None)
        return events

    assert run(go()) == ["A", "B", "timeout"]


def test_read_deadline_set_during_a_wait_without_one_is_enforced() -> None:
    async def go() -> float:
        loop = asyncio.get_running_loop()
        s = Stream(loop=loop)
        s.set_deadline(None)
        loop.call_later(0.05, s.set_deadline, 0.2)
        start = loop.time()
        with pytest.raises(TimeoutError):
            await s.readline(100)
        s.connection_lost(None)
        return loop.time() - start

    elapsed = run(go())
    assert 0.25 <= elapsed < 0.25 + 0.025 + 0.25


def _v2(fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("fam", "body"),
    [
        (0x12, bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 25])),  # DGRAM
        (0x1F, bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 25])),  # an undefined transport
        (0x11, bytes([0, 0, 0, 0, 192, 0, 2, 2, 0, 1, 0, 25])),  # 0.0.0.0
        (0x11, bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 0, 0, 25])),  # port 0
    ],
)
def test_proxy_v2_takes_stream_sources_of_tcp_clients_only(fam: int, body: bytes) -> None:
    with pytest.raises(ProxyError):
        run(read_header(fed(_v2(fam, body))))


def test_proxy_v2_stream() -> None:
    info = run(read_header(fed(_v2(0x11, bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 25])))))
    assert (info.src_addr, info.src_port) == ("192.0.2.1", 1)
