"""One process's limit state (gateway/store/memory.py): concurrency counts that never
go below zero, drained keys forgotten, the table bounded, operators' views exact.
(Its GCRA decisions, shared with every store: test_base.py.)"""

from __future__ import annotations

import asyncio

from gateway.store.base import CONC, RATE, Entry, GcraOp
from gateway.store.memory import MemoryStore
from tests.unit.fakes import Clock


def test_releasing_more_than_was_acquired_never_goes_below_zero() -> None:
    s = MemoryStore()
    assert s.acquire("conc:c:x", 1)
    s.release("conc:c:x")
    s.release("conc:c:x")  # a double release (a session ending twice)
    assert s._conc == {}  # a released key is forgotten, not kept at 0 or -1
    assert s.acquire("conc:c:x", 1) and not s.acquire("conc:c:x", 1)


def test_drained_keys_are_not_shown_and_are_pruned_past_the_bound() -> None:
    clock = Clock()
    s = MemoryStore(clock)
    assert s.take([GcraOp("rate:l:old", 10, 1, 0, 1)]) == -1
    clock.t += 11  # drained
    assert asyncio.run(s.entries("l:", exact=False)) == []
    for n in range(100_000):  # the table's bound; the next take prunes what drained
        s._tat[f"rate:l:{n}"] = clock.t + 5
    assert s.take([GcraOp("rate:l:new", 10, 1, 0, 1)]) == -1
    assert "rate:l:old" not in s._tat and "rate:l:new" in s._tat
    assert len(s._tat) == 100_001  # every live key kept


def test_an_exact_key_is_only_that_key_and_a_prefix_every_key_under_it() -> None:
    clock = Clock()
    s = MemoryStore(clock)
    for ip in ("192.0.2.1", "192.0.2.10"):
        assert s.take([GcraOp(f"rate:l:{ip}", 60, 6, 0, 1)]) == -1
    assert s.acquire("conc:l:192.0.2.1", 2)
    exact = asyncio.run(s.entries("l:192.0.2.1", exact=True))
    assert exact == [Entry(CONC, "l:192.0.2.1", 1), Entry(RATE, "l:192.0.2.1", 10.0)]
    assert len(asyncio.run(s.entries("l:192.0.2.1", exact=False))) == 3
    assert asyncio.run(s.reset("l:", exact=False)) == 3
    assert asyncio.run(s.entries("l:", exact=False)) == []


def test_a_refused_take_charges_none_of_its_limits() -> None:
    clock = Clock()
    s = MemoryStore(clock)
    ops = [GcraOp("rate:a:x", 60, 10, 0, 1), GcraOp("rate:b:x", 60, 1, 0, 2)]
    assert s.take(ops) == 1  # b refuses a cost of 2 cells with room for 1
    assert s._tat == {}
