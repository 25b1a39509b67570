"""The table the workers of one machine share (gateway/store/shared.py): forked
processes on one file, no server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.store.base import GcraOp
from gateway.store.shared import SharedStore


def _forked(children: int, work: Callable[[int], int]) -> list[int]:
    """Run work(i) in `children` forked processes, started together; their results."""
    go_r, go_w = os.pipe()
    pids = []
    for i in range(children):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            os.close(r)
            code = 0
            try:
                os.read(go_r, 1)  # every child is forked before any starts
                os.write(w, str(work(i)).encode())
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        pids.append((pid, r))
    os.write(go_w, b"g" * children)
    os.close(go_r)
    os.close(go_w)
    out = []
    for pid, r in pids:
        with os.fdopen(r, "rb") as f:
            out.append(int(f.read() or b"-1"))
        assert os.waitpid(pid, 0)[1] == 0
    return out


def test_workers_sharing_a_table_count_as_one(tmp_path: Path) -> None:
    """Two processes taking from one limit at once: exactly its capacity is allowed
    in all, however their takes interleave (per worker it was twice that; without
    the lock, updates are lost and more gets through)."""
    path = str(tmp_path / "limits.table")
    SharedStore.create(path, workers=2)
    op = GcraOp("rate:per_ip:192.0.2.1", 3600, 500, 0, 1)

    def work(i: int) -> int:
        s = SharedStore(path, i)
        return sum(s.take([op]) == -1 for _ in range(2000))

    allowed = _forked(2, work)
    assert sum(allowed) == 500, allowed
    s = SharedStore(path, 0)
    [entry] = asyncio.run(s.entries("per_ip:", exact=False))
    assert entry.key == "per_ip:192.0.2.1" and entry.value == pytest.approx(3600, abs=5)


def test_concurrency_is_shared_and_a_restarted_worker_frees_its_slots(tmp_path: Path) -> None:
    path = str(tmp_path / "limits.table")
    SharedStore.create(path, workers=2)
    w0, w1 = SharedStore(path, 0), SharedStore(path, 1)
    assert w0.acquire("conc:conns:192.0.2.1", 3) and w0.acquire("conc:conns:192.0.2.1", 3)
    assert w1.acquire("conc:conns:192.0.2.1", 3)
    assert not w1.acquire("conc:conns:192.0.2.1", 3)  # 3 in all, across the workers
    w1.release("conc:conns:192.0.2.1")
    w1.release("conc:conns:192.0.2.1")  # one more than it holds: never below zero
    assert w1.acquire("conc:conns:192.0.2.1", 3)
    assert not w0.acquire("conc:conns:192.0.2.1", 3)
    SharedStore(path, 0)  # worker 0 restarted: the connections it counted are gone
    assert w1.acquire("conc:conns:192.0.2.1", 3) and w1.acquire("conc:conns:192.0.2.1", 3)
    assert not w1.acquire("conc:conns:192.0.2.1", 3)


def test_a_full_probe_window_never_refuses_wrongly(tmp_path: Path) -> None:
    """More live keys than slots: a key may lose its debt (the table is too small),
    but a key within its limit is never refused because of another's."""
    path = str(tmp_path / "limits.table")
    SharedStore.create(path, workers=1, rate_slots=8, conc_slots=8)
    s = SharedStore(path, 0)
    for n in range(200):
        assert s.take([GcraOp(f"rate:l:{n}", 3600, 1, 0, 1)]) == -1
    for n in range(40):
        assert s.acquire(f"conc:c:{n}", 1)  # beyond 8 keys: not counted, not refused


def test_an_operators_scan_gives_the_event_loop_back(tmp_path: Path) -> None:
    """`ratelimit show` reads the whole shared table (80,000 slots, about 12 ms) in
    chunks, giving the event loop back between them: the worker's sessions go on
    while an operator looks, instead of all waiting for the scan."""
    path = str(tmp_path / "limits.table")
    SharedStore.create(path, workers=1)
    s = SharedStore(path, 0)
    assert s.take([GcraOp("rate:per_ip:192.0.2.1", 60, 10, 0, 1)]) == -1

    async def go() -> tuple[bool, list[str]]:
        scan = asyncio.create_task(s.entries("per_ip:", exact=False))
        await asyncio.sleep(0)  # the scan reads its first chunk, then yields
        running = not scan.done()
        return running, [e.key for e in await scan]

    assert asyncio.run(go()) == (True, ["per_ip:192.0.2.1"])
