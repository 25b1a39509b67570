"""GCRA and concurrency state, with a controlled clock: exact and deterministic."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.checks.ratelimit import parse_rate
from gateway.net import network_of
from gateway.store.base import CONC, RATE, Entry, GcraOp
from gateway.store.memory import MemoryStore
from gateway.store.shared import SharedStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gcra(s: MemoryStore, key: str, period: float, n: int, burst: int, cost: int = 1) -> bool:
    return s.take([GcraOp(key, period, n, burst, cost)]) == -1


Make = Callable[..., MemoryStore]


@pytest.fixture(params=["memory", "shared"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    """Each store's decisions must be the same: one process's dictionaries, or the
    table the workers of one machine share (here as its only worker)."""

    def build(clock: Callable[[], float] = time.monotonic) -> MemoryStore:
        if request.param == "memory":
            return MemoryStore(clock)
        path = str(tmp_path / "limits.table")
        SharedStore.create(path, workers=1, rate_slots=1024, conc_slots=256)
        return SharedStore(path, 0, clock)

    return build


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


def test_parse_rate_and_networks() -> None:
    assert parse_rate("100/minute") == (100, 60.0)
    assert parse_rate("5/10s") == (5, 10.0)
    assert parse_rate("2/second") == (2, 1.0)
    for bad in ("0/minute", "x/minute", "5/fortnight"):
        with pytest.raises((ValueError, KeyError)):
            parse_rate(bad)
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"


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


def test_operator_routes_answer_loopback_only(make: Make) -> None:
    from gateway.http import HttpEndpoint

    store = make()
    assert store.acquire("conc:conns:192.0.2.1", 3)
    http = HttpEndpoint(lambda: (True, {}), store)
    status, _, body = asyncio.run(http.route("GET", "/ratelimit?key=conns", "192.0.2.9"))
    assert status == 403
    status, _, body = asyncio.run(http.route("POST", "/ratelimit/reset?key=conns", "10.0.0.1"))
    assert status == 403 and asyncio.run(store.entries("conns:", exact=False))
    status, _, body = asyncio.run(http.route("GET", "/ratelimit?key=conns", "127.0.0.1"))
    assert status == 200 and b'"key": "conns:192.0.2.1"' in body
    assert asyncio.run(http.route("GET", "/ratelimit/reset?key=conns", "::1"))[0] == 405
    assert asyncio.run(http.route("POST", "/ratelimit/reset?key=conns", "::1"))[0] == 200
    assert asyncio.run(store.entries("conns:", exact=False)) == []


def test_store_and_limit_config_errors_name_the_key(tmp_path: Path) -> None:
    from gateway import config
    from gateway.checks.registry import all_known_symbols
    from gateway.pipeline import policy

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("store:\n  redis_url: http://127.0.0.1:6379\n")
    with pytest.raises(config.ConfigError, match=r"store\.redis_url: .*redis://"):
        config.load(cfg, env={})
    pol = tmp_path / "p.yaml"
    pol.write_text(
        "checks:\n  ratelimit:\n    limits:\n      - {name: a, rate: 1/minute}\n"
        "    concurrency:\n      - {name: a, max: 2}\n"
    )
    with pytest.raises(config.ConfigError, match=r"checks\.ratelimit.*'a' is used twice"):
        policy.load(str(pol), all_known_symbols())
    pol.write_text(
        "checks:\n  ratelimit:\n    limits:\n      - {name: 'bad name', rate: 1/minute}\n"
    )
    with pytest.raises(config.ConfigError, match=r"checks\.ratelimit\.limits\.0\.name"):
        policy.load(str(pol), all_known_symbols())


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
