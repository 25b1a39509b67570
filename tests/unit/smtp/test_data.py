"""DATA (gateway/smtp/data.py): the message read within its bounds and its bytes
judged, from a stream fed directly (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from gateway import replies
from gateway.config import BareLinefeed
from gateway.smtp.data import DataRefused, check_wire, read_message
from gateway.smtp.memory import MessageMemory, Reservation
from gateway.smtp.protocol import Receiver
from gateway.stream import Stream
from gateway.wire import unstuff
from tests.unit.fakes import fed, run


def room(limit: int = 1 << 30) -> Reservation:
    return Reservation(MessageMemory(limit))


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
