"""The session in memory (gateway/smtp/local.py) that `smtp-gateway check` and these
tests drive: replies read whole however they are written, a hang-up seen by the
session, and the accepting backend keeping what it was sent."""

from __future__ import annotations

import asyncio

import pytest

from gateway import config
from gateway.smtp.local import AcceptingBackend, LocalSession, MemoryTransport, _reply_end
from gateway.stream import Stream
from tests.unit.smtp.sessions import session_run


@pytest.mark.parametrize(
    ("buf", "start", "end"),
    [
        (b"250 ok\r\n", 0, 8),
        (b"250-a\r\n250-b\r\n250 c\r\nrest", 0, 21),
        (b"250-a\r\n250-b\r\n", 0, None),  # the last line has not come yet
        (b"250 ok", 0, None),
        (b"220 hi\r\n250 ok\r\n", 8, 16),
        (b"354\r\n", 0, 5),  # a code alone is a complete reply
    ],
)
def test_a_reply_ends_after_its_line_with_a_space(buf: bytes, start: int, end: int | None) -> None:
    assert _reply_end(bytearray(buf), start) == end


def test_the_transport_keeps_what_is_written_and_tells_the_stream_of_a_close() -> None:
    async def go() -> tuple[bytes, bool, bool]:
        stream = Stream()
        t = MemoryTransport(stream, ("192.0.2.7", 4000))
        stream.connection_made(t)
        t.write(b"220 a\r\n")
        t.writelines([b"250 ", b"b\r\n"])
        assert t.get_extra_info("peername") == ("192.0.2.7", 4000)
        t.close()
        await asyncio.sleep(0)  # the loss is delivered on the next turn, as a socket's
        return bytes(t.written), t.is_closing(), stream.at_eof

    assert asyncio.run(go()) == (b"220 a\r\n250 b\r\n", True, True)


def test_a_client_hanging_up_ends_the_session_run(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> tuple[bool, bool]:
        await s.start()
        await s.send("EHLO client.test")
        await s.close()
        assert s.task is not None
        return s.task.done(), s.closed

    assert session_run(settings, play) == (True, True)


def test_the_accepting_backend_keeps_each_transaction(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[tuple[str, list[str]]]:
        await s.start()
        await s.send("EHLO client.test")
        for sender in ("a@one.test", "b@two.test"):
            await s.send(f"MAIL FROM:<{sender}>")
            await s.send("RCPT TO:<x@example.test>")
            await s.send("RCPT TO:<y@example.test>")
            await s.send("DATA")
            await s.message(b"Subject: s\r\n\r\nhi\r\n")
        assert backend.available
        return [(r.sender, r.recipients) for r in backend.relayed]

    both = ["x@example.test", "y@example.test"]
    assert session_run(settings, play) == [("a@one.test", both), ("b@two.test", both)]
