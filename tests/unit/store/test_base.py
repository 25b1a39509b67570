"""GCRA and concurrency state (the contract of gateway/store/base.py), with a
controlled clock: exact and deterministic, and the same decisions from every store."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store.base import CONC, RATE, Entry, GcraOp
from tests.unit.fakes import Clock
from tests.unit.store.stores import Make, gcra


def test_sender_at_the_allowed_rate_is_never_refused(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    for _ in range(10_000):  # 10/second, exactly every 0.1 s, no burst
        assert gcra(s, "k", 1.0, 10, 0)
        clock.t += 0.1


def test_capacity_then_refusal_then_drain_on_time(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    # 6/minute (one cell per 10 s) plus a burst of 2: eight at once, the ninth refused.
    assert [gcra(s, "k", 60, 6, 2) for _ in range(9)] == [True] * 8 + [False]
    clock.t += 9.99
    assert not gcra(s, "k", 60, 6, 2)  # not yet: one cell drains after 10 s
    clock.t += 0.02
    assert gcra(s, "k", 60, 6, 2)
    assert not gcra(s, "k", 60, 6, 2)
    clock.t += 30.0  # three cells drained
    assert [gcra(s, "k", 60, 6, 2) for _ in range(4)] == [True, True, True, False]


def test_refusals_do_not_consume_capacity_and_costs_count(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    assert gcra(s, "b", 1.0, 1000, 0, cost=1000)  # 1000 bytes/second: one 1000-byte message
    for _ in range(50):
        assert not gcra(s, "b", 1.0, 1000, 0, cost=10)
    clock.t += 1.0
    assert gcra(s, "b", 1.0, 1000, 0, cost=1000)


def test_concurrency_slots(make: Make) -> None:
    s = make()
    assert s.acquire("c", 2) and s.acquire("c", 2) and not s.acquire("c", 2)
    s.release("c")
    assert s.acquire("c", 2)


def test_take_is_all_or_nothing_across_limits(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    small = GcraOp("rate:small:x", 60, 1, 0, 1)
    big = GcraOp("rate:big:x", 60, 100, 0, 1)
    assert s.take([big, small]) == -1
    # `small` is exhausted: it is named, and `big` is not charged for the refusal.
    for _ in range(10):
        assert s.take([big, small]) == 1
    assert [e.key for e in asyncio.run(s.entries("big:", exact=False))] == ["big:x"]
    debt = asyncio.run(s.entries("big:x", exact=True))[0].value
    assert debt == pytest.approx(0.6)  # one cell of 60/100 s, not eleven


def test_operators_show_and_reset(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    assert gcra(s, "rate:per_ip:192.0.2.1", 60, 2, 0)
    assert gcra(s, "rate:per_ip:192.0.2.10", 60, 2, 0)
    assert s.acquire("conc:conns:192.0.2.1", 5)
    shown = asyncio.run(s.entries("per_ip:192.0.2.1", exact=True))
    assert shown == [Entry(RATE, "per_ip:192.0.2.1", 30.0)]
    assert len(asyncio.run(s.entries("per_ip:", exact=False))) == 2
    assert asyncio.run(s.entries("conns:192.0.2.1", exact=True)) == [
        Entry(CONC, "conns:192.0.2.1", 1)
    ]
    assert asyncio.run(s.reset("per_ip:192.0.2.1", exact=True)) == 1
    assert asyncio.run(s.entries("per_ip:", exact=False))[0].key == "per_ip:192.0.2.10"
    assert gcra(s, "rate:per_ip:192.0.2.1", 60, 2, 0) and gcra(s, "rate:per_ip:192.0.2.1", 60, 2, 0)
    clock.t += 61  # drained keys are not shown
    assert asyncio.run(s.entries("per_ip:", exact=False)) == []
