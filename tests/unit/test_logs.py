"""The log output: lines queued together leave together, in order; a warning at once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway import logs


class Recording(io.StringIO):
    """A stream that remembers each write it was given, and when it came."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.written: asyncio.Event | None = None  # set at each write, if a test waits
        self.at: list[float] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        with contextlib.suppress(RuntimeError):
            self.at.append(asyncio.get_running_loop().time())
        if self.written is not None:
            self.written.set()
        return super().write(s)


@pytest.fixture
def out() -> Iterator[Recording]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = Recording()
    logs.setup("INFO", "json", stream)
    yield stream
    logs.flush()
    root.handlers[:], root.level = saved[0], saved[1]


def test_events_queued_together_leave_in_one_write_after_the_delay(out: Recording) -> None:
    async def main() -> tuple[list[str], float]:
        out.written = asyncio.Event()
        loop = asyncio.get_running_loop()
        start = loop.time()
        logs.event("first", n=1)
        await asyncio.sleep(0)  # later iterations join the queue: no write per iteration
        logs.event("second", n=2)
        await asyncio.sleep(0)
        before = list(out.writes)
        await asyncio.wait_for(out.written.wait(), 5)
        return before, out.at[0] - start

    before, waited = asyncio.run(main())
    assert before == []
    assert waited >= logs.FLUSH_DELAY * 0.9  # the loop's clock may round a timer early
    [write] = out.writes
    lines = [json.loads(line) for line in write.splitlines()]
    assert [e["event"] for e in lines] == ["first", "second"]
    assert lines[0]["logger"] == "gateway.events" and lines[0]["n"] == 1
    assert all(isinstance(e["pid"], int) and e["pid"] > 0 for e in lines)


def test_a_warning_leaves_at_once_with_the_lines_queued_before_it(out: Recording) -> None:
    async def main() -> list[str]:
        logs.event("first", n=1)
        logging.getLogger("gateway.backend").warning("backend %s failed", "x")
        written = list(out.writes)  # no await: written within the warning's own call
        logs.event("third", n=3)
        return written

    [write] = asyncio.run(main())
    lines = [json.loads(line) for line in write.splitlines()]
    assert [e.get("event") or e["msg"] for e in lines] == ["first", "backend x failed"]
    assert lines[1]["level"] == "warning" and lines[1]["logger"] == "gateway.backend"
    # The event after it was queued for the timer (which asyncio.run's loop may
    # not live to fire); a flush brings it, in its own write.
    logs.flush()
    assert [json.loads(w)["event"] for w in out.writes[1:]] == ["third"]


def test_a_burst_past_the_byte_bound_leaves_at_once(out: Recording) -> None:
    async def main() -> int:
        n = 0
        while not out.writes and n < 1000:
            logs.event("burst", n=n, pad="x" * 1000)
            n += 1
        return n

    n = asyncio.run(main())
    # Lines of about 1,100 characters: the write came once the queue passed the bound.
    assert logs.FLUSH_BYTES / 1200 < n <= logs.FLUSH_BYTES / 1000 + 1
    assert len(out.writes[0].splitlines()) == n


def test_without_a_running_loop_a_line_is_written_at_once(out: Recording) -> None:
    logs.event("config_warning", message="x")
    assert len(out.writes) == 1 and json.loads(out.writes[0])["event"] == "config_warning"


def test_below_info_events_are_not_written(out: Recording) -> None:
    logs.setup("WARNING", "json", out)
    assert not logs.enabled()
    logs.event("transaction", session="s")
    logging.getLogger("gateway").warning("still written")
    assert [json.loads(w)["msg"] for w in out.writes] == ["still written"]


def test_key_value_format_and_tracebacks(out: Recording) -> None:
    logs.setup("INFO", "kv", out)
    logs.event("transaction", session="abc", reply="250 2.0.0 ok")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("gateway.app").exception("crashed")
    event, crash = out.writes
    assert event.startswith("ts=") and " level=info logger=gateway.events pid=" in event
    assert event.endswith(' event=transaction session=abc reply="250 2.0.0 ok"\n')
    assert "msg=crashed" in crash and "ValueError: boom" in crash


def test_a_loop_that_stops_before_its_flush_loses_nothing(out: Recording) -> None:
    loop = asyncio.new_event_loop()

    def last() -> None:
        logs.event("last_in_loop")  # queued for a timer that never fires
        loop.stop()

    try:
        loop.call_soon(last)
        loop.run_forever()
    finally:
        loop.close()
    logs.event("after_loop")  # no loop now: written at once, with what was queued
    lines = [json.loads(line)["event"] for w in out.writes for line in w.splitlines()]
    assert lines == ["last_in_loop", "after_loop"]


def test_failures_are_warnings_that_a_warning_level_keeps() -> None:
    """A refused reload is an operator's business: at `logging.level: WARNING` it is
    written (at once), while the ordinary events are not."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = Recording()
    logs.setup("WARNING", "json", stream)
    try:
        logs.event("reloaded", policy="default")
        logs.failure("reload_failed", error="p.yaml: actions.x: unknown symbol")
        logs.failure("worker_died", severe=True, worker=1)
        lines = [json.loads(w) for w in stream.writes for w in w.splitlines() if w]
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    assert [(x["level"], x["event"]) for x in lines] == [
        ("warning", "reload_failed"),
        ("error", "worker_died"),
    ]
    assert lines[0]["error"] == "p.yaml: actions.x: unknown symbol"


def test_lines_queued_when_a_loop_stopped_go_to_their_own_stream_not_the_next() -> None:
    """A loop that ends before its flush timer leaves lines queued; the next setup
    (a reload's new stream, the next test's) must not get them."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    first, second = Recording(), Recording()
    try:
        logs.setup("INFO", "json", first)

        async def stop_before_the_flush() -> None:
            logs.event("from_the_first", n=1)

        asyncio.run(stop_before_the_flush())
        assert first.writes == []  # still queued: its timer died with the loop
        logs.setup("INFO", "json", second)
        logs.event("from_the_second", n=2)
        logs.flush()
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert [json.loads(x)["event"] for w in first.writes for x in w.splitlines()] == [
        "from_the_first"
    ]
    assert [json.loads(x)["event"] for w in second.writes for x in w.splitlines()] == [
        "from_the_second"
    ]
