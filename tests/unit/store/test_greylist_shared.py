"""The greylist table the workers of one machine share (gateway/store/greylist_shared.py):
several mappings of one file, and forked processes on it, judge as one process. Its
decisions themselves: test_greylist.py (the same as the in-memory store's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.store.greylist_shared import SharedGreylist, table_path
from tests.unit.fakes import Clock
from tests.unit.store.test_greylist import NET, P, one


def test_the_table_lies_beside_the_rate_limit_table() -> None:
    assert table_path("/run/gw/metrics/ratelimit.table") == "/run/gw/metrics/greylist.table"


def test_a_file_that_is_no_greylist_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.table"
    path.write_bytes(b"SGWLIM01" + bytes(120))
    with pytest.raises(ValueError, match="not a greylist table"):
        SharedGreylist(str(path))


def test_workers_sharing_a_table_judge_as_one(tmp_path: Path) -> None:
    """Two workers (two mappings of one table): a retry landing on the other worker
    finds the first attempt (with a table per worker it was a new triplet again)."""
    clock = Clock()
    path = str(tmp_path / "greylist.table")
    SharedGreylist.create(path, slots=1024)
    w0, w1 = SharedGreylist(path, clock), SharedGreylist(path, clock)
    assert one(w0)[0] == "new"
    clock.t += 10
    assert one(w1) == ("early", 290)
    clock.t += 290
    assert one(w1)[0] == "passed"
    assert one(w0)[0] == "whitelisted"


def test_simultaneous_first_attempts_in_forked_workers_make_one_new_triplet(
    tmp_path: Path,
) -> None:
    """Under the record lock, a triplet's first attempt is one: of many workers
    judging it at the same moment, exactly one finds it unknown."""
    path = str(tmp_path / "greylist.table")
    SharedGreylist.create(path, slots=4096)
    keys = [f"grey:t:192.0.2.0/24|s{i}@sender.test|r@example.test" for i in range(300)]
    go_r, go_w = os.pipe()
    children = []
    for _ in range(3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 0
            try:
                os.close(r)
                os.read(go_r, 1)
                g = SharedGreylist(path)
                new = sum(g.judge(NET, [k], P)[0].result == "new" for k in keys)
                os.write(w, str(new).encode())
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        children.append((pid, r))
    os.write(go_w, b"ggg")
    news = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            news.append(int(f.read() or b"-1"))
        assert os.waitpid(pid, 0)[1] == 0
    os.close(go_r)
    os.close(go_w)
    assert sum(news) == len(keys), news


NET_A = "grey:n:203.0.113.0/24"


def spam(i: int) -> str:
    return f"grey:t:203.0.113.0/24|spam{i}@x.test|r@example.test"


def lists_hold(g: SharedGreylist) -> dict[int, int]:
    """Every network's list, walked: its length is its count, its members are pending
    entries pointing back at it, oldest first, and no other slot claims a network.
    {network slot: count}."""
    counts = {}
    claimed = set()
    for net in range(g.nets):
        if not g.n_hash[net]:
            assert g.n_count[net] == g.n_head[net] == g.n_tail[net] == 0
            continue
        seen, prev, link, since = 0, 0, g.n_head[net], float("-inf")
        while link:
            slot = link - 1
            assert g.owner[slot] == net + 1 and g.prev[slot] == prev and g.kinds[slot] == 1
            assert g.since[slot] >= since
            since, prev, link = g.since[slot], link, g.next[slot]
            claimed.add(slot)
            seen += 1
            assert seen <= g.slots
        assert g.n_tail[net] == prev and seen == g.n_count[net] > 0
        counts[net] = seen
    assert {s for s in range(g.slots) if g.owner[s]} == claimed
    return counts


def test_workers_sharing_a_table_count_a_networks_pending_entries_as_one(tmp_path: Path) -> None:
    """A flood spread over two workers (two mappings) meets one cap: another
    network's first attempt stays, and its retry passes at either worker."""
    clock = Clock()
    path = str(tmp_path / "greylist.table")
    SharedGreylist.create(path, slots=64)
    w0, w1 = SharedGreylist(path, clock), SharedGreylist(path, clock)
    p = P._replace(max_pending=10)
    assert one(w0, p=p)[0] == "new"
    results = [(w0, w1)[i % 2].judge(NET_A, [spam(i)], p)[0].result for i in range(100)]
    assert results.count("new") == 10 and results.count("capped") == 90
    assert w0.pending_of(NET_A) == w1.pending_of(NET_A) == 10
    clock.t += 300
    assert [(w1, w0)[i % 2].judge(NET_A, [spam(i)], p)[0].result for i in range(20)] == (
        ["passed"] * 10 + ["new"] * 10  # each new one displaced one that had waited
    )
    assert one(w1, p=p)[0] == "passed"
    assert sorted(lists_hold(w0).values()) == [10]


def test_forked_workers_flooding_at_once_leave_one_consistent_cap(tmp_path: Path) -> None:
    """Three processes flood one network's new triplets at the same moment, each
    displacing the network's oldest (delay 0): under the record lock the network
    ends with exactly its cap of pending entries, its list intact, and another
    network's entry untouched."""
    path = str(tmp_path / "greylist.table")
    SharedGreylist.create(path, slots=1024)
    p = P._replace(delay=0, max_pending=50)
    parent = SharedGreylist(path)
    assert one(parent, p=P)[0] == "new"  # with the real delay: kept only if not displaced
    go_r, go_w = os.pipe()
    children = []
    for c in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 0
            try:
                os.read(go_r, 1)
                g = SharedGreylist(path)
                for i in range(c * 1000, c * 1000 + 1000):
                    assert g.judge(NET_A, [spam(i)], p)[0].result == "new"
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    os.write(go_w, b"ggg")
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    os.close(go_r)
    os.close(go_w)
    assert parent.pending_of(NET_A) == 50
    assert sorted(lists_hold(parent).values()) == [1, 50]
    live = sum(1 for s in range(parent.slots) if parent.hashes[s] and parent.kinds[s] == 1)
    assert live == 51
    assert one(parent, p=P)[0] == "early"  # the other network's first attempt is there
