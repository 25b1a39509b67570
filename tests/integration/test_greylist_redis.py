"""Greylisting in a real redis-server, shared by two gateway processes.

Time: the decision runs as a Redis script on Redis's clock (`TIME`), which no test
can move. So the delay here is one second, and the test waits on Redis's own clock
until the first attempt is a second old (as the lease test of
test_ratelimit_redis.py waits for a lease's expiry), never on a sleep standing in
for it. The long periods (expire, ttl, the auto-whitelist's) are checked as the
expiries Redis holds for the keys; their effect on decisions, on a controlled
clock, is tests/unit/store/test_greylist_store.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from tests.integration.test_greylist import OFF, attempt, greylist_cli
from tests.support.procs import Backend, Gateway, base_config
from tests.support.redisserver import RedisServer

KEY = "smtp-gateway:grey:t:127.0.0.0/24|a@sender.test|x@example.test"
NET = "smtp-gateway:grey:n:127.0.0.0/24"


def shared(
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
    server: RedisServer,
    greylist: str,
    actions: str = "",
) -> Gateway:
    pol = f"extends: default\n{actions}checks:\n{OFF}  greylist: {{enabled: true, {greylist}}}\n"
    cfg = base_config(backend.url, trusted_networks=[], store={"redis_url": server.url})
    return gateway_factory(cfg, policy=pol)


def redis_now_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def triplets(gw: Gateway, result: str) -> float:
    """This gateway's own count (one process each: flushed before /metrics answers)."""
    return gw.metric(f'smtp_gateway_greylist_triplets_total{{result="{result}"}}')


def test_a_triplet_deferred_by_one_gateway_passes_at_the_other_after_the_delay(
    backend: Backend, gateway_factory: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    opts = "delay: 1, expire: 3600, ttl: 86400, auto_whitelist: {after: 2, ttl: 7200}"
    a = shared(backend, gateway_factory, redis_server, opts)
    b = shared(backend, gateway_factory, redis_server, opts)
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert attempt(a.port()) == [(451, b"4.7.1 Greylisted, please try again in 1 second")]
        value = r.get(KEY)
        assert value is not None and value.startswith("p:")
        first = int(value[2:])
        assert 3_599_000 < r.pttl(KEY) <= 3_600_000  # pending: `expire` from the first attempt
        # At once at B: the retry is early, not a first attempt (B found A's entry).
        assert attempt(b.port())[0][0] == 451
        assert (triplets(b, "early"), triplets(b, "new")) == (1, 0)
        # Redis's clock, which decides, past the delay.
        deadline = time.monotonic() + 10
        while redis_now_ms(r) < first + 1000:
            assert time.monotonic() < deadline, "Redis's clock did not pass the delay"
            time.sleep(0.02)
        [(rcpt, _), (data, _)] = attempt(b.port())
        assert (rcpt, data) == (250, 250)
        assert triplets(b, "passed") == 1
        assert r.get(KEY).startswith("w:") and 86_399_000 < r.pttl(KEY) <= 86_400_000  # ttl
        # A: the same triplet is whitelisted for it too; the network's second pass ...
        assert attempt(a.port())[0][0] == 250
        assert triplets(a, "whitelisted") == 1
        assert r.get(NET) == "2" and 7_199_000 < r.pttl(NET) <= 7_200_000
        # ... auto-whitelists the network: a new sender passes at once, at either.
        assert attempt(b.port(), sender="new@other.test")[0][0] == 250
        assert triplets(b, "network") == 1
        assert len(backend.messages()) == 3
        shown = greylist_cli(a, "show", "127.0.0.1")
        assert "n:127.0.0.0/24: 2 pass(es), auto-whitelisted, forgotten in 120 min" in shown
        assert "t:127.0.0.0/24|a@sender.test|x@example.test: whitelisted, passed " in shown
        assert "reset (2 entries removed)" in greylist_cli(b, "reset", "127.0.0.1")
        assert r.get(KEY) is None and r.get(NET) is None
        assert attempt(a.port())[0][0] == 451
    finally:
        r.close()


@pytest.mark.parametrize("closed", [False, True], ids=["fail-open", "fail-closed"])
def test_redis_stopped_is_the_policys_choice(
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
    redis_server: RedisServer,
    closed: bool,
) -> None:
    actions = "actions:\n  greylist.unavailable: tempfail\n" if closed else ""
    gw = shared(backend, gateway_factory, redis_server, "delay: 3600", actions)
    assert attempt(gw.port())[0][0] == 451
    redis_server.stop()
    replies = attempt(gw.port())
    if closed:
        assert replies == [(451, b"4.3.0 Greylisting service unavailable, try again later")]
        assert backend.messages() == []
    else:
        assert [code for code, _ in replies] == [250, 250]  # through, ungreylisted
        assert len(backend.messages()) == 1
    assert triplets(gw, "unavailable") == 1
    gw.wait_log(lambda e: "greylist store error" in str(e.get("msg", "")))
    # Redis back (empty: it kept nothing): greylisting again, after the back-off.
    redis_server.start()
    deadline = time.monotonic() + 10
    while attempt(gw.port())[0] != (451, b"4.7.1 Greylisted, please try again in 3600 seconds"):
        assert time.monotonic() < deadline, "greylisting did not resume with Redis"
        time.sleep(0.2)
