"""Buffered metric updates: after a flush, prometheus-client exposes exactly what
direct updates would have, and nothing before it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway import metrics

BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 1, 30)


def _exposition(reg: CollectorRegistry) -> list[str]:
    text = generate_latest(reg).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def _pair() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


values = st.one_of(
    st.sampled_from([*BOUNDS, 0.0, -1.0, math.inf]),
    st.floats(min_value=-10, max_value=100, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(values, max_size=40))
def test_flushed_histogram_equals_direct_observations(observed: list[float]) -> None:
    direct_reg, buffered_reg = _pair()
    direct = Histogram("h", "h", ["k"], buckets=BOUNDS, registry=direct_reg)
    buffered = Histogram("h", "h", ["k"], buckets=BOUNDS, registry=buffered_reg)
    b = metrics.BufferedHistogram(buffered.labels("x"))
    d = direct.labels("x")
    for v in observed:
        d.observe(v)
        b.observe(v)
    metrics.flush()
    assert _exposition(buffered_reg) == _exposition(direct_reg)


def test_counter_and_gauge_are_written_only_by_flush() -> None:
    direct_reg, buffered_reg = _pair()
    dc = Counter("c", "c", ["k"], registry=direct_reg)
    dg = Gauge("g", "g", registry=direct_reg)
    bc = metrics.BufferedCounter(Counter("c", "c", ["k"], registry=buffered_reg).labels("x"))
    bg = metrics.BufferedGauge(Gauge("g", "g", registry=buffered_reg))
    before = _exposition(buffered_reg)
    for _ in range(5):
        dc.labels("x").inc()
        bc.inc()
    dc.labels("x").inc(2.5)
    bc.inc(2.5)
    dg.inc(3)
    bg.inc(3)
    dg.set(7)  # a set discards the increments before it ...
    bg.set(7)
    dg.dec(2)  # ... and the ones after it apply on top
    bg.dec(2)
    assert _exposition(buffered_reg) == before  # nothing written yet
    metrics.flush()
    assert _exposition(buffered_reg) == _exposition(direct_reg)
    metrics.flush()  # a second flush with nothing pending changes nothing
    assert _exposition(buffered_reg) == _exposition(direct_reg)


def test_child_buffers_each_series_once_by_kind() -> None:
    c = metrics.child(metrics.TRANSACTIONS, "delivered", "backend")
    assert isinstance(c, metrics.BufferedCounter)
    assert metrics.child(metrics.TRANSACTIONS, "delivered", "backend") is c
    assert isinstance(metrics.child(metrics.MESSAGE_SIZE), metrics.BufferedHistogram)
    assert isinstance(metrics.child(metrics.BACKEND_UP), metrics.BufferedGauge)


def test_a_series_that_cannot_be_written_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = CollectorRegistry()
    labelled = metrics.BufferedCounter(Counter("l", "l", ["k"], registry=reg))  # no labels: a bug
    fine = metrics.BufferedCounter(Counter("f", "f", registry=reg))
    labelled.inc()
    fine.inc(2)
    metrics.flush()
    assert "f_total 2.0" in _exposition(reg)
    assert "metric update dropped" in caplog.text
