"""When runs fall, with a clock the test moves, and who runs them."""

from __future__ import annotations

import asyncio

import pytest

from gateway.dmarcreports.schedule import Scheduler, is_sender, next_run
from tests.unit.fakes import Clock

DAY = 86400
MIDNIGHT = 1_700_006_400  # 2023-11-15 00:00:00 UTC


@pytest.mark.parametrize(
    ("now", "interval", "delay", "due"),
    [
        (MIDNIGHT, DAY, 600, MIDNIGHT + 600),  # at midnight: ten minutes later
        (MIDNIGHT + 599, DAY, 600, MIDNIGHT + 600),
        (MIDNIGHT + 600, DAY, 600, MIDNIGHT + DAY + 600),  # just run: tomorrow's
        (MIDNIGHT + 43_200, DAY, 600, MIDNIGHT + DAY + 600),
        (MIDNIGHT + 5, 3600, 0, MIDNIGHT + 3600),
        (MIDNIGHT + 3 * 3600 + 1, 3 * 3600, 60, MIDNIGHT + 3 * 3600 + 60),
        (MIDNIGHT + 3 * 3600 + 60, 3 * 3600, 60, MIDNIGHT + 6 * 3600 + 60),
    ],
)
def test_runs_fall_a_delay_after_utc_aligned_boundaries(
    now: float, interval: int, delay: float, due: float
) -> None:
    assert next_run(now, interval, delay) == due
    assert (due - delay) % interval == 0 and (due - delay) % DAY % interval == 0


def test_only_worker_zero_sends() -> None:
    assert is_sender(0) and not is_sender(1) and not is_sender(7)


class Reporter:
    def __init__(self, clock: Clock, fail_first: bool = False) -> None:
        self.clock = clock
        self.runs: list[float] = []
        self.fail_first = fail_first

    async def run(self, now: float) -> None:
        self.runs.append(now)
        if self.fail_first and len(self.runs) == 1:
            raise RuntimeError("store down")


def drive(reporter: Reporter, clock: Clock, runs: int) -> list[float]:
    """The scheduler with a sleep that moves the clock instead of waiting."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.t += seconds
        if len(reporter.runs) >= runs:
            raise asyncio.CancelledError

    sched = Scheduler(reporter, DAY, 600, clock=clock, sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(sched.run())
    return slept


def test_a_run_at_start_then_one_each_day_ten_minutes_past_midnight() -> None:
    clock = Clock()
    clock.t = MIDNIGHT + 12 * 3600
    reporter = Reporter(clock)
    drive(reporter, clock, 3)
    assert reporter.runs == [MIDNIGHT + 12 * 3600, MIDNIGHT + DAY + 600, MIDNIGHT + 2 * DAY + 600]


def test_a_failed_run_does_not_stop_the_next() -> None:
    clock = Clock()
    clock.t = MIDNIGHT
    reporter = Reporter(clock, fail_first=True)
    drive(reporter, clock, 2)
    assert reporter.runs == [MIDNIGHT, MIDNIGHT + 600]
