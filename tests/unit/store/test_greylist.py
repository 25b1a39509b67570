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


# -- a flood of new triplets: each client network holds at most max_pending ----------

NET_A = "grey:n:203.0.113.0/24"  # the flooding network
CAP = 10
PC = P._replace(max_pending=CAP)


def flood(s: Store, n: int, start: int = 0, net: str = NET_A, p: Params = PC) -> list[str]:
    """n new triplets of `net`, one a decision as a pipelining client sends them;
    their results."""
    origin = net.removeprefix("grey:n:")
    return [
        s.judge(net, [f"grey:t:{origin}|spam{i}@x.test|r@example.test"], p)[0].result
        for i in range(start, start + n)
    ]


def spam(i: int, origin: str = "203.0.113.0/24") -> str:
    return f"grey:t:{origin}|spam{i}@x.test|r@example.test"


def again(s: Store, i: int) -> tuple[str, float]:
    """The flooding network's attempt at its triplet spam<i> (again)."""
    [j] = s.judge(NET_A, [spam(i)], PC)
    return j.result, j.wait


def test_a_flood_from_one_network_keeps_no_other_network_greylisted(make: Make) -> None:
    """The review's attack, small: a legitimate first attempt, then one network sends
    ten times its cap of new, never retried triplets into a store that holds fewer.
    Before the cap, the flood pushed the oldest pending entry out (the legitimate
    one) and its retry was deferred again; now the flood displaces only its own."""
    clock = Clock()
    s = make(clock, slots=64)
    assert one(s, T1, PC)[0] == "new"  # 192.0.2.0/24's first attempt
    clock.t += 1
    results = flood(s, 10 * CAP)
    counts = s.pending_of(NET_A), s.pending_of(NET)
    clock.t += 300
    assert one(s, T1, PC)[0] == "passed"  # the legitimate retry after `delay`
    assert results == ["new"] * CAP + ["capped"] * 9 * CAP  # none `delay` old yet
    assert counts == (CAP, 1)
    assert s.pending_of(NET) == 0


def test_past_its_cap_a_network_displaces_its_own_oldest_pending_entries(make: Make) -> None:
    """Once its entries have waited `delay` (their senders had the time to retry),
    each new triplet of a network at its cap displaces its oldest: the network
    recovers `delay` after a flood, not `expire`, and records at most CAP new
    triplets a `delay`."""
    clock = Clock()
    s = make(clock, slots=64)
    flood(s, CAP)  # spam0..9
    clock.t += 300
    assert flood(s, 2 * CAP, start=CAP) == ["new"] * CAP + ["capped"] * CAP
    assert s.pending_of(NET_A) == CAP
    clock.t += 300
    assert [again(s, i)[0] for i in range(CAP, 2 * CAP)] == ["passed"] * CAP  # kept
    assert [again(s, i)[0] for i in range(CAP)] == ["new"] * CAP  # displaced for them
    assert s.pending_of(NET_A) == CAP


def test_a_capped_triplet_is_not_recorded(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    flood(s, CAP)
    assert again(s, CAP) == ("capped", 300)
    clock.t += 300
    # Not recorded: its retry is a first attempt (the oldest pending one made room).
    assert again(s, CAP) == ("new", 300)
    assert again(s, 1) == ("passed", 0)
    assert again(s, 0) == ("new", 300)  # the one displaced for spam10


def test_a_pass_reset_or_allow_leaves_room_for_the_networks_next_triplet(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    flood(s, 1)
    clock.t += 200
    flood(s, CAP - 1, start=1)
    clock.t += 100  # spam0 has waited `delay`, the others not
    assert again(s, 0)[0] == "passed"
    assert s.pending_of(NET_A) == CAP - 1
    assert flood(s, 2, start=100) == ["new", "capped"]

    async def go() -> None:
        assert await s.reset("t:203.0.113.0/24|spam1@", exact=False) == 1
        assert s.pending_of(NET_A) == CAP - 1
        await s.allow(spam(2).removeprefix("grey:"), PC)
        assert s.pending_of(NET_A) == CAP - 2

    asyncio.run(go())
    assert flood(s, 3, start=200) == ["new", "new", "capped"]


def test_a_retry_from_another_network_frees_the_first_networks_count(make: Make) -> None:
    """An SPF origin's retry may come from another network than its first attempt:
    the entry stays charged to the network that made it, until it passes."""
    clock = Clock()
    s = make(clock)
    key = "grey:t:spf:sender.test|alice@sender.test|bob@example.test"
    assert s.judge(NET_A, [key], PC)[0].result == "new"
    assert s.pending_of(NET_A) == 1
    clock.t += 300
    assert s.judge("grey:n:198.51.100.0/24", [key], PC)[0].result == "passed"
    assert s.pending_of(NET_A) == 0 and s.pending_of("grey:n:198.51.100.0/24") == 0


def test_expired_entries_leave_room_and_a_lower_cap_applies_at_once(make: Make) -> None:
    clock = Clock()
    s = make(clock)
    flood(s, CAP)
    clock.t += 2 * DAY  # all expired: they count until displaced, and all may be
    assert flood(s, CAP, start=CAP) == ["new"] * CAP
    assert s.pending_of(NET_A) == CAP
    clock.t += 300
    lower = PC._replace(max_pending=3)  # a reload lowered the cap
    assert flood(s, 1, start=99, p=lower) == ["new"]
    assert s.pending_of(NET_A) == 3


def test_a_full_store_sheds_the_heaviest_networks_pending_entries_first(make: Make) -> None:
    """The store full (many networks, each under its cap): a network holding one
    pending entry keeps it while others hold more, whether it came before the
    flood or into the full store (a full store never refuses a new triplet)."""
    clock = Clock()
    s = make(clock, slots=64)
    p = P._replace(max_pending=20)
    assert one(s, T1, p)[0] == "new"
    nets = [f"grey:n:198.51.{i}.0/24" for i in range(8)]
    for net in nets:  # 160 pending entries for 64 places
        flood(s, 20, net=net, p=p)
    late = "grey:n:192.0.2.0/24"
    t2 = "grey:t:192.0.2.0/24|carol@sender.test|bob@example.test"
    for net in nets:  # and the flood goes on, the late-comer's first attempt amid it
        if net == nets[4]:
            assert s.judge(late, [t2], p)[0].result == "new"
        flood(s, 20, start=100, net=net, p=p)
    clock.t += 300
    assert [j.result for j in s.judge(NET, [T1, t2], p)] == ["passed", "passed"]


def test_a_full_store_keeps_whitelisted_entries_that_expire_before_the_floods(
    make: Make,
) -> None:
    """Pending entries give way before whitelisted ones whatever their expiries: with
    a `ttl` shorter than `expire`, the whitelisted entries are the ones expiring
    soonest, and a full probe window of the shared table gave them up first."""
    clock = Clock()
    s = make(clock, slots=64)
    p = P._replace(ttl=DAY, max_pending=20)
    kept = [f"grey:t:192.0.2.0/24|s{i}@sender.test|r@example.test" for i in range(8)]
    s.judge(NET, kept, p)
    clock.t += 300
    assert {j.result for j in s.judge(NET, kept, p)} == {"passed"}
    for i in range(20):  # 400 pending entries from 20 networks for 64 places
        flood(s, 20, net=f"grey:n:198.51.{i}.0/24", p=p)
    assert {j.result for j in s.judge(NET, kept, p)} == {"whitelisted"}
