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

import asyncio
import time
from collections.abc import Callable

import pytest
import redis

from tests.integration.test_greylist import OFF, attempt, greylist_cli
from tests.support.procs import Backend, Gateway, base_config
from tests.support.redisserver import RedisServer

KEY = "smtp-gateway:grey:t:127.0.0.0/24|a@sender.test|x@example.test"
NET = "smtp-gateway:grey:n:127.0.0.0/24"
OWNED = "smtp-gateway:grey:o:127.0.0.0/24"  # the network's pending entries


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
        stamp, owner = value[2:].split("|")
        first = int(stamp)
        assert owner == "127.0.0.0/24"  # the client network it is charged to ...
        assert r.zrange(OWNED, 0, -1, withscores=True) == [(KEY, first)]  # ... and counted in
        assert 3_599_000 < r.pttl(KEY) <= 3_600_000  # pending: `expire` from the first attempt
        assert 3_599_000 < r.pttl(OWNED) <= 3_600_000  # the set: its newest entry's expiry
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
        assert not r.exists(OWNED)  # passed: no longer pending, its network's set empty
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


def test_a_flood_from_one_network_displaces_only_its_own_pending_entries_in_redis(
    redis_server: RedisServer,
) -> None:
    """The review's attack on the Redis store (store/greylist_redis.py), the store's
    script against a real redis-server: one network's flood of ten times its cap of
    new triplets records its cap and no more; another network's first attempt stays
    and passes after the delay (on Redis's clock); once the flood's entries have
    waited the delay, its next triplets displace its own oldest. The counts are
    sorted sets that expire with their entries and follow passes, allows and resets."""
    from gateway.store.greylist import Params
    from gateway.store.greylist_redis import RedisGreylist
    from gateway.store.redis import RedisStore

    cap = 20
    p = Params(delay=1, expire=3600, ttl=86400, awl_after=0, awl_ttl=7200, max_pending=cap)
    legit_net, flood_net = "grey:n:192.0.2.0/24", "grey:n:203.0.113.0/24"
    legit = "grey:t:192.0.2.0/24|alice@partner.test|bob@example.test"
    prefix = "smtp-gateway:"
    owned = prefix + "grey:o:203.0.113.0/24"

    def spam(i: int) -> str:
        return f"grey:t:203.0.113.0/24|spam{i}@x.test|r@example.test"

    r = redis.Redis.from_url(redis_server.url, decode_responses=True)

    async def go() -> None:
        store = RedisStore(redis_server.url, prefix=prefix, timeout=5, lease_ttl=30)
        grey = RedisGreylist(store)
        try:
            [first] = await grey.judge(legit_net, [legit], p)
            assert first.result == "new"
            # One script, one instant: none of the flood has waited the delay.
            judged = await grey.judge(flood_net, [spam(i) for i in range(10 * cap)], p)
            assert [j.result for j in judged] == ["new"] * cap + ["capped"] * 9 * cap
            assert r.zcard(owned) == cap
            assert len(r.keys(prefix + "grey:t:203.0.113.0/24|*")) == cap
            assert 3_599_000 < r.pttl(owned) <= 3_600_000  # it cannot outlive its entries
            # Redis's clock past the delay for everything recorded so far.
            start = redis_now_ms(r)
            deadline = time.monotonic() + 10
            while redis_now_ms(r) < start + 1000:
                assert time.monotonic() < deadline, "Redis's clock did not pass the delay"
                await asyncio.sleep(0.02)
            [retry] = await grey.judge(legit_net, [legit], p)
            assert retry.result == "passed"
            assert not r.exists(prefix + "grey:o:192.0.2.0/24")
            # The flood's entries waited the delay: its next ones displace its oldest.
            more = await grey.judge(flood_net, [spam(i) for i in range(1000, 1000 + 2 * cap)], p)
            assert [j.result for j in more] == ["new"] * cap + ["capped"] * cap
            members = set(r.zrange(owned, 0, -1))
            assert members == {prefix + spam(i) for i in range(1000, 1000 + cap)}
            assert not any(r.exists(prefix + spam(i)) for i in range(cap))
            # Leaving the pending state leaves the set: allow, reset.
            await grey.allow(spam(1000).removeprefix("grey:"), p)
            assert await grey.reset(spam(1001).removeprefix("grey:"), exact=True) == 1
            assert r.zcard(owned) == cap - 2
            # The sets are no entries for the operators' commands.
            shown = await grey.entries("", exact=False)
            assert {e.state for e in shown} == {"pending", "whitelisted"}
            assert len(shown) == cap - 2 + 2  # 18 pending, alice's and spam1000 whitelisted
            assert await grey.reset("", exact=False) == len(shown)
            assert r.keys(prefix + "*") == []
            # A pending value as earlier versions wrote it (no network): still judged.
            old = "grey:t:198.51.100.0/24|carol@old.test|bob@example.test"
            r.set(prefix + old, f"p:{redis_now_ms(r) - 2000}", px=3_600_000)
            assert (await grey.judge("grey:n:198.51.100.0/24", [old], p))[0].result == "passed"
        finally:
            await store.close()

    try:
        asyncio.run(go())
    finally:
        r.close()


def test_a_flood_from_one_network_cannot_make_redis_evict_another_networks_entry(
    redis_server: RedisServer,
) -> None:
    """Redis short of memory with `maxmemory-policy volatile-ttl` (as
    docs/greylisting.md advises) evicts the keys nearest their expiry: the oldest
    pending triplets, the legitimate first attempt among them. Before the cap a
    flood of new triplets from one network filled the memory and Redis evicted it;
    now the flood holds its cap of keys and the memory is never short."""
    from gateway.store.greylist import Params
    from gateway.store.greylist_redis import RedisGreylist
    from gateway.store.redis import RedisStore

    p = Params(delay=0.001, expire=3600, ttl=86400, awl_after=0, awl_ttl=7200, max_pending=100)
    legit = "grey:t:192.0.2.0/24|alice@partner.test|bob@example.test"
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 1_000_000)
    r.config_set("maxmemory-policy", "volatile-ttl")

    async def go() -> None:
        store = RedisStore(redis_server.url, prefix="smtp-gateway:", timeout=5, lease_ttl=30)
        grey = RedisGreylist(store)
        try:
            assert (await grey.judge("grey:n:192.0.2.0/24", [legit], p))[0].result == "new"
            for batch in range(0, 20_000, 500):  # about 3 MB of keys without the cap
                keys = [
                    f"grey:t:203.0.113.0/24|spam{i}@x.test|r@example.test"
                    for i in range(batch, batch + 500)
                ]
                await grey.judge("grey:n:203.0.113.0/24", keys, p)
            assert (await grey.judge("grey:n:192.0.2.0/24", [legit], p))[0].result == "passed"
            assert r.info("stats")["evicted_keys"] == 0
        finally:
            await store.close()

    try:
        asyncio.run(go())
    finally:
        r.close()
