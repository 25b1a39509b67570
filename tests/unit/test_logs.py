"""The log output: lines of one event-loop iteration leave together, in order."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway import logs


class Recording(io.StringIO):
    """A stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
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


def test_lines_of_one_iteration_leave_in_one_write_in_order(out: Recording) -> None:
    async def main() -> list[str]:
        logs.event("first", n=1)
        logging.getLogger("gateway.backend").warning("backend %s failed", "x")
        logs.event("third", n=3)
        before = list(out.writes)
        await asyncio.sleep(0)  # the iteration ends: the queued lines are written
        return before

    assert asyncio.run(main()) == []
    [write] = out.writes
    lines = [json.loads(line) for line in write.splitlines()]
    assert [e.get("event") or e["msg"] for e in lines] == ["first", "backend x failed", "third"]
    assert lines[1]["level"] == "warning" and lines[1]["logger"] == "gateway.backend"
    assert lines[0]["logger"] == "gateway.events" and lines[0]["n"] == 1
    assert all(isinstance(e["pid"], int) and e["pid"] > 0 for e in lines)


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
        logs.event("last_in_loop")  # queued for the end of an iteration that never comes
        loop.stop()

    try:
        loop.call_soon(last)
        loop.run_forever()
    finally:
        loop.close()
    logs.event("after_loop")  # no loop now: written at once, with what was queued
    lines = [json.loads(line)["event"] for w in out.writes for line in w.splitlines()]
    assert lines == ["last_in_loop", "after_loop"]
