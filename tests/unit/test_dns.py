"""The resolver's own health: a resolver failing most queries is told to the
operator (a warning a minute, figures for /healthz/ready), on a fake clock."""

from __future__ import annotations

import logging

import pytest

from gateway.dns import Health


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_failing_resolver_is_warned_of_once_a_minute_and_its_recovery_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    h = Health(clock)
    caplog.set_level(logging.WARNING, "gateway.dns")
    for _ in range(9):
        h.record(failed=True)
    assert not h.failing and caplog.records == []  # nine queries: too few to judge
    h.record(failed=True)
    assert h.failing and len(caplog.records) == 1
    assert "10 of 10 queries in the last 60 s" in caplog.records[0].getMessage()
    clock.t += 30
    for _ in range(10):
        h.record(failed=True)
    assert len(caplog.records) == 1  # within the minute: no second warning
    clock.t += 31
    h.record(failed=True)
    assert len(caplog.records) == 2  # a minute on, still failing: warned again
    assert h.state() == {"failing": True, "queries": 11, "failed": 11, "window_seconds": 60.0}
    clock.t += 61  # the failures age out of the window
    for _ in range(10):
        h.record(failed=False)
    assert not h.failing
    assert "answering again" in caplog.records[-1].getMessage()
    assert h.state()["failed"] == 0


def test_a_minority_of_failures_is_no_failing_resolver(caplog: pytest.LogCaptureFixture) -> None:
    h = Health(Clock())
    caplog.set_level(logging.WARNING, "gateway.dns")
    for i in range(100):
        h.record(failed=i % 4 == 0)  # a quarter
    assert not h.failing and caplog.records == []
    assert h.state()["queries"] == 100 and h.state()["failed"] == 25


def test_near_the_line_the_verdict_does_not_flap(caplog: pytest.LogCaptureFixture) -> None:
    """Past half failing, it stays failing until under a quarter: one warning, not
    one per query as the share crosses a half back and forth."""
    h = Health(Clock())
    caplog.set_level(logging.WARNING, "gateway.dns")
    for i in range(100):
        h.record(failed=i % 2 == 0)
    assert h.failing and len(caplog.records) == 1
    for _ in range(100):
        h.record(failed=False)  # 50 of 200: a quarter, still failing
    assert h.failing and len(caplog.records) == 1
    h.record(failed=False)  # 50 of 201: under a quarter
    assert not h.failing and "answering again" in caplog.records[-1].getMessage()
