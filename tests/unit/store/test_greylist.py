"""Greylist state (gateway/store/greylist.py) on a controlled clock: the same
decisions from one process's dictionary and from the table the workers of one
machine share (store/greylist_shared.py, whose sharing is test_greylist_shared.py's).
The Redis store runs them as a script on Redis's clock:
tests/integration/test_greylist_redis.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.store.greylist import MemoryGreylist, Params
from gateway.store.greylist_shared import SharedGreylist
from tests.unit.fakes import Clock

DAY = 86400.0
P = Params(delay=300, expire=2 * DAY, ttl=36 * DAY, awl_after=0, awl_ttl=7 * DAY)
NET = "grey:n:192.0.2.0/24"
T1 = "grey:t:192.0.2.0/24|alice@sender.test|bob@example.test"
T2 = "grey:t:192.0.2.0/24|carol@sender.test|bob@example.test"

Store = MemoryGreylist | SharedGreylist
Make = Callable[..., Store]


@pytest.fixture(params=["memory", "shared"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    def build(clock: Clock, slots: int = 1024) -> Store:
        if request.param == "memory":
            return MemoryGreylist(clock, capacity=slots)
        path = str(tmp_path / "greylist.table")
        if not os.path.exists(path):
            SharedGreylist.create(path, slots=slots)
        return SharedGreylist(path, clock)

    return build


def one(s: Store, key: str = T1, p: Params = P) -> tuple[str, float]:
    [j] = s.judge(NET, [key], p)
    return j.result, j.wait


def test_first_attempt_deferred_retry_after_delay_passes_then_whitelisted(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    assert one(s) == ("new", 300)
    clock.t += 299.5
    assert one(s) == ("early", pytest.approx(0.5))
    clock.t += 0.5  # exactly `delay` after the first attempt
    assert one(s) == ("passed", 0)
    clock.t += 10 * DAY
    assert one(s) == ("whitelisted", 0)
    assert one(s, T2) == ("new", 300)  # another sender: its own triplet


def test_early_retries_do_not_move_the_first_attempt(make: Make) -> None:
    """A client retrying every minute passes five minutes after its first attempt,
    as one that waited (postgrey's rule): the early attempts are not new ones."""
    clock = Clock()
    s = make(clock)
    results = []
    for _ in range(6):
        results.append(one(s)[0])
        clock.t += 60
    assert results == ["new", "early", "early", "early", "early", "passed"]


def test_a_retry_after_expire_counts_as_a_first_attempt(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    assert one(s)[0] == "new"
    clock.t += 2 * DAY + 1
    assert one(s) == ("new", 300)
    clock.t += 300
    assert one(s)[0] == "passed"


def test_whitelisted_triplet_is_renewed_by_use_and_forgotten_unused(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    one(s)
    clock.t += 300
    assert one(s)[0] == "passed"
    for _ in range(3):  # used every 35 days: stays whitelisted for 105 days
        clock.t += 35 * DAY
        assert one(s)[0] == "whitelisted"
    clock.t += 36 * DAY + 1  # unused for longer than ttl
    assert one(s)[0] == "new"


def test_network_auto_whitelisted_after_n_passes_and_forgotten_unused(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    p = P._replace(awl_after=2)
    assert [j.result for j in s.judge(NET, [T1, T2], p)] == ["new", "new"]
    clock.t += 300
    assert [j.result for j in s.judge(NET, [T1, T2], p)] == ["passed", "passed"]
    fresh = "grey:t:192.0.2.0/24|dave@other.test|erin@example.test"
    assert one(s, fresh, p) == ("network", 0)  # never seen, passes with its network
    other_net = s.judge("grey:n:198.51.100.0/24", [fresh], p)
    assert other_net[0].result == "new"  # another network's is its own
    clock.t += 7 * DAY - 1
    assert one(s, fresh, p)[0] == "network"  # the use renewed it ...
    clock.t += 7 * DAY + 1
    assert one(s, fresh, p)[0] == "new"  # ... and unused it was forgotten


def test_auto_whitelisting_off_never_passes_a_network(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    s.judge(NET, [T1, T2], P)
    clock.t += 300
    s.judge(NET, [T1, T2], P)
    assert one(s, "grey:t:192.0.2.0/24|x@y.test|z@example.test")[0] == "new"


def test_operators_see_allow_and_reset_entries(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    p = P._replace(awl_after=5)
    s.judge(NET, [T1], p)
    clock.t += 60

    async def go() -> None:
        [pending] = await s.entries("t:192.0.2.0/24|", exact=False)
        assert pending.key == T1.removeprefix("grey:") and pending.state == "pending"
        assert pending.age == 60 and pending.left == 2 * DAY - 60
        await s.allow(T2.removeprefix("grey:"), p)
        await s.allow("n:192.0.2.0/24", p)
        states = {e.key: (e.state, e.passes) for e in await s.entries("", exact=False)}
        assert states == {
            "n:192.0.2.0/24": ("network", 5),
            "t:192.0.2.0/24|alice@sender.test|bob@example.test": ("pending", 0),
            "t:192.0.2.0/24|carol@sender.test|bob@example.test": ("whitelisted", 0),
        }
        assert one(s, "grey:t:192.0.2.0/24|new@x.test|y@example.test", p)[0] == "network"
        assert await s.reset("n:192.0.2.0/24", exact=True) == 1
        assert await s.reset("t:192.0.2.0/24|", exact=False) == 2
        assert await s.entries("", exact=False) == []

    asyncio.run(go())
    assert one(s)[0] == "new"


def test_a_full_table_gives_up_pending_entries_before_whitelisted_ones(make: Make) -> None:
    """A flood of new triplets (a client makes them at will) must not push out the
    whitelisted ones (made only by retrying each after the delay)."""
    clock = Clock()
    s = make(clock, slots=64)
    kept = [f"grey:t:192.0.2.0/24|s{i}@sender.test|r@example.test" for i in range(8)]
    s.judge(NET, kept, P)
    clock.t += 300
    assert {j.result for j in s.judge(NET, kept, P)} == {"passed"}
    for i in range(1000):
        one(s, f"grey:t:203.0.113.0/24|spam{i}@x.test|r@example.test")
    assert {j.result for j in s.judge(NET, kept, P)} == {"whitelisted"}
