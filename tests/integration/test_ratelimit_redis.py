"""Shared limits in a real redis-server, across gateway processes."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
import redis

from tests.integration.test_ratelimit import OFF, send
from tests.integration.test_ratelimit import ratelimit_cli as cli
from tests.support.procs import Backend, Gateway, base_config
from tests.support.redisserver import RedisServer
from tests.support.smtp import RawClient


def shared(
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
    redis: RedisServer,
    limits: str,
    actions: str = "",
    **store: object,
) -> Gateway:
    pol = (
        "actions:\n  ratelimit.exceeded: tempfail\n  ratelimit.concurrency: tempfail\n"
        + actions
        + OFF
        + "  ratelimit:\n"
        + limits
        # Only the limits each test names (not the preset's per-client session limits).
        + ("" if "concurrency" in limits else "    concurrency: []\n")
    )
    cfg = base_config(backend.url, trusted_networks=[], store={"redis_url": redis.url, **store})
    return gateway_factory(cfg, policy=pol)


def greeting(port: int) -> tuple[int, str]:
    with RawClient(port) as c:
        return c.reply()


def wait_for_greeting(port: int, code: int, timeout: float) -> float:
    """Seconds until a new connection gets `code`; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if greeting(port)[0] == code:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"no {code} greeting within {timeout}s")


def store_errors(gw: Gateway) -> float:
    return gw.metric("smtp_gateway_ratelimit_store_errors_total{")


MSGS = "    limits:\n      - {name: msgs, key: client_ip, unit: messages, rate: 3/hour}\n"


def test_two_gateways_share_one_count_and_operators_show_and_reset(
    backend: Backend, gateway_factory: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    a = shared(backend, gateway_factory, redis_server, MSGS)
    b = shared(backend, gateway_factory, redis_server, MSGS)
    assert [send(a.port())[0], send(b.port())[0], send(a.port())[0]] == [250, 250, 250]
    code, msg = send(b.port())
    assert (code, msg[:5]) == (450, b"4.7.1")
    assert send(a.port())[0] == 450
    assert len(backend.messages()) == 3

    shown = cli(a, "show", "msgs:127.0.0.1")
    assert "msgs:127.0.0.1: 3.0 of 3 messages used" in shown
    assert "0.0 left" in shown
    assert "msgs:127.0.0.1" in cli(b, "show", "msgs")  # the limit name lists its keys
    assert "1 key(s) removed" in cli(b, "reset", "msgs:127.0.0.1")
    assert "nothing counted" in cli(a, "show", "msgs:127.0.0.1")
    assert send(b.port())[0] == 250


CONC = "    concurrency:\n      - {name: conns, key: client_ip, max: 1}\n"


def test_concurrency_slot_is_shared_and_freed_at_close(
    backend: Backend, gateway_factory: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    a = shared(backend, gateway_factory, redis_server, CONC, lease_ttl=60)
    b = shared(backend, gateway_factory, redis_server, CONC, lease_ttl=60)
    with RawClient(a.port()) as held:
        assert held.reply()[0] == 220
        code, text = greeting(b.port())
        assert code == 421 and "4.7.0" in text
        assert "1 of 1 connection slot(s) held" in cli(b, "show", "conns:127.0.0.1")
        held.cmd("QUIT")
    # Released by the closing session, not by expiry: the lease would last 60 s.
    assert wait_for_greeting(b.port(), 220, timeout=5) < 5


def redis_now_ms(r: redis.Redis) -> int:
    """Redis's clock as the lease scripts read it (store/redis.py: TIME, in ms)."""
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def test_killed_gateway_leases_expire(
    backend: Backend, gateway_factory: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    a = shared(backend, gateway_factory, redis_server, CONC, lease_ttl=2)
    b = shared(backend, gateway_factory, redis_server, CONC, lease_ttl=2)
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    held = RawClient(a.port())
    try:
        assert held.reply()[0] == 220
        # A's slot: one lease in a sorted set scored by its expiry (ms of Redis TIME).
        key = "smtp-gateway:conc:conns:127.0.0.1"
        [(lease, first_expiry)] = r.zrange(key, 0, -1, withscores=True)
        # Held longer than the lease: a live gateway renews it, so B still refuses.
        # Redis owns the clock, so wait on it: until A has renewed the lease past its
        # first expiry and Redis's time is past that expiry too.
        deadline = time.monotonic() + 10
        while True:
            score = r.zscore(key, lease)
            assert score is not None, "A's lease expired: it was not renewed"
            if score > first_expiry and redis_now_ms(r) > first_expiry:
                break
            assert time.monotonic() < deadline, "A's lease was not renewed past its expiry"
            time.sleep(0.05)
        assert greeting(b.port())[0] == 421
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        assert greeting(b.port())[0] == 421  # the dead replica's lease is still running
        waited = wait_for_greeting(b.port(), 220, timeout=10)
        assert waited <= 2.5
    finally:
        held.close()
        r.close()


@pytest.mark.parametrize("closed", [False, True], ids=["fail-open", "fail-closed"])
def test_redis_stopped_mid_run(
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
    redis_server: RedisServer,
    closed: bool,
) -> None:
    actions = "  ratelimit.unavailable: tempfail\n" if closed else ""
    gw = shared(backend, gateway_factory, redis_server, MSGS, actions)
    assert send(gw.port())[0] == 250
    assert store_errors(gw) == 0
    redis_server.stop()
    code, msg = send(gw.port())
    if closed:
        assert (code, msg[:5]) == (451, b"4.3.0")
        assert len(backend.messages()) == 1
    else:
        assert code == 250
        assert len(backend.messages()) == 2
    assert store_errors(gw) >= 1
    gw.wait_log(lambda e: "rate-limit store error" in str(e.get("msg", "")))
    # Redis back: limits apply again (after the one-second back-off).
    redis_server.start()
    deadline = time.monotonic() + 10
    while send(gw.port())[0] != 250:
        assert time.monotonic() < deadline, "limits did not recover with Redis"
        time.sleep(0.2)
