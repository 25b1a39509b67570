"""The byte stream (gateway/stream.py): lines, their limit and the read deadline, fed
directly (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.stream import LineTooLong, Stream, StreamClosed
from tests.unit.fakes import fed, run


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
