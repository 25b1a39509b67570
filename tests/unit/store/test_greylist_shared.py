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
