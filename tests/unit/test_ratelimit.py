"""GCRA and concurrency state, with a controlled clock: exact and deterministic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.checks.ratelimit import network_of, parse_rate
from gateway.store.base import CONC, RATE, Entry, GcraOp
from gateway.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gcra(s: MemoryStore, key: str, period: float, n: int, burst: int, cost: int = 1) -> bool:
    return s.take([GcraOp(key, period, n, burst, cost)]) == -1


def test_sender_at_the_allowed_rate_is_never_refused() -> None:
    clock = Clock()
    s = MemoryStore(clock)
    for _ in range(10_000):  # 10/second, exactly every 0.1 s, no burst
        assert gcra(s, "k", 1.0, 10, 0)
        clock.t += 0.1


def test_capacity_then_refusal_then_drain_on_time() -> None:
    clock = Clock()
    s = MemoryStore(clock)
    # 6/minute (one cell per 10 s) plus a burst of 2: eight at once, the ninth refused.
    assert [gcra(s, "k", 60, 6, 2) for _ in range(9)] == [True] * 8 + [False]
    clock.t += 9.99
    assert not gcra(s, "k", 60, 6, 2)  # not yet: one cell drains after 10 s
    clock.t += 0.02
    assert gcra(s, "k", 60, 6, 2)
    assert not gcra(s, "k", 60, 6, 2)
    clock.t += 30.0  # three cells drained
    assert [gcra(s, "k", 60, 6, 2) for _ in range(4)] == [True, True, True, False]


def test_refusals_do_not_consume_capacity_and_costs_count() -> None:
    clock = Clock()
    s = MemoryStore(clock)
    assert gcra(s, "b", 1.0, 1000, 0, cost=1000)  # 1000 bytes/second: one 1000-byte message
    for _ in range(50):
        assert not gcra(s, "b", 1.0, 1000, 0, cost=10)
    clock.t += 1.0
    assert gcra(s, "b", 1.0, 1000, 0, cost=1000)


def test_concurrency_slots() -> None:
    s = MemoryStore()
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


def test_take_is_all_or_nothing_across_limits() -> None:
    clock = Clock()
    s = MemoryStore(clock)
    small = GcraOp("rate:small:x", 60, 1, 0, 1)
    big = GcraOp("rate:big:x", 60, 100, 0, 1)
    assert s.take([big, small]) == -1
    # `small` is exhausted: it is named, and `big` is not charged for the refusal.
    for _ in range(10):
        assert s.take([big, small]) == 1
    assert [e.key for e in asyncio.run(s.entries("big:", exact=False))] == ["big:x"]
    debt = asyncio.run(s.entries("big:x", exact=True))[0].value
    assert debt == pytest.approx(0.6)  # one cell of 60/100 s, not eleven


def test_operators_show_and_reset() -> None:
    clock = Clock()
    s = MemoryStore(clock)
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


def test_operator_routes_answer_loopback_only() -> None:
    from gateway.http import HttpEndpoint

    store = MemoryStore()
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
