"""The backend session pool: warm spares that each go to one client session and
never come back, their idle timer, and the cap (backend.max_sessions): who waits,
who gets the room that comes free, and that no way of ending a session loses its
place. Fake sessions (pure logic); the real thing is in
tests/integration/test_backend_limits.py and tests/interop/."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway.forward.client import BackendBusy, BackendLost, SmtpClient
from gateway.forward.pool import Pool


class FakeSession:
    """What the pool looks at: reusable, closed, last_used; close() tells on_close."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.last_used = time.monotonic()
        self.peer_closed = False
        self.broken = False
        self.stream = SimpleNamespace(on_lost=None)  # what the pool hooks on a spare
        self.on_close: Callable[[Any], None] | None = None

    @property
    def closed(self) -> bool:
        return self.broken or self.peer_closed

    @property
    def reusable(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.broken = True
        told, self.on_close = self.on_close, None
        if told is not None:
            told(self)

    def quit_now(self) -> None:
        self.quit_sent = True
        self.close()


def make_pool(
    max_open: int | None,
    wait: float = 5.0,
    fail: list[Exception] | None = None,
    size: int = 0,
) -> Pool:
    made: list[FakeSession] = []

    async def factory() -> SmtpClient:
        if fail:
            raise fail.pop(0)
        s = FakeSession(len(made))
        made.append(s)
        return cast(SmtpClient, s)

    pool = Pool(factory, size=size, idle_timeout=30, label="t", max_open=max_open, wait=wait)
    pool.made = made  # type: ignore[attr-defined]
    return pool


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _use_once(pool: Pool, served: list[Any], name: Any) -> None:
    """Acquire, note the turn, hold the session a moment, end it (a client session)."""
    s, _ = await pool.acquire()
    served.append(name)
    await _turns(2)
    s.close()


def test_without_a_cap_every_acquire_connects() -> None:
    async def go() -> int:
        pool = make_pool(None)
        sessions = [await pool.acquire() for _ in range(50)]
        assert all(not reused for _, reused in sessions)
        return pool.open

    assert asyncio.run(go()) == 50


def test_spares_go_to_one_client_session_each_and_are_replaced() -> None:
    async def go() -> None:
        pool = make_pool(None, size=3)
        await asyncio.gather(*pool.warm())
        assert pool.idle == 3
        taken = [await pool.acquire() for _ in range(10)]
        sessions = [s for s, _ in taken]
        assert len({id(s) for s in sessions}) == 10  # never one session for two
        assert [reused for _, reused in taken][:3] == [True, True, True]
        await _turns()
        assert pool.idle == 3  # the spares taken were replaced in the background
        for s in sessions:
            s.close()
        assert pool.open == 3  # closed sessions never come back; only the spares

    asyncio.run(go())


def test_a_fresh_session_is_asked_for_after_a_spare_failed() -> None:
    """A backend restart closes every spare at once; the one that failed may not be
    the only one dead that the loop has not seen yet."""

    async def go() -> None:
        pool = make_pool(None, size=2)
        await asyncio.gather(*pool.warm())
        spares = list(pool._idle)
        s, reused = await pool.acquire(fresh=True)
        assert not reused and s not in spares and pool.idle == 2

    asyncio.run(go())


def test_a_dead_spare_is_not_handed_out() -> None:
    async def go() -> None:
        pool = make_pool(None, size=1)
        await asyncio.gather(*pool.warm())
        spare = pool._idle[0]
        cast(FakeSession, spare).peer_closed = True  # the backend restarted meanwhile
        s, reused = await pool.acquire()
        assert s is not spare and not reused

    asyncio.run(go())


def test_a_spare_the_backend_closes_leaves_the_pool_at_once() -> None:
    async def go() -> None:
        pool = make_pool(None, size=2)
        await asyncio.gather(*pool.warm())
        spare = cast(FakeSession, pool._idle[0])
        assert pool.open == 2
        spare.peer_closed = True
        spare.stream.on_lost()  # what Stream.connection_lost calls
        assert pool.idle == 1 and pool.open == 1 and spare.broken
        taken, _ = await pool.acquire()
        assert taken is not spare and taken.stream.on_lost is None  # unhooked once taken

    asyncio.run(go())


def test_spares_are_closed_by_a_timer_after_idle_timeout() -> None:
    async def go() -> None:
        pool = make_pool(None, size=2)
        await asyncio.gather(*pool.warm())
        assert pool._sweep is not None  # armed when the first spare arrived
        loop = asyncio.get_running_loop()
        newest = max(c.last_used for c in pool._idle)
        assert pool._sweep.when() - loop.time() <= pool.idle_timeout + 0.1
        old = pool._idle[0]
        cast(FakeSession, old).last_used = newest - pool.idle_timeout  # its time is up
        pool._sweep.cancel()
        pool._sweep = None
        pool._expire()  # what the timer runs
        assert getattr(old, "quit_sent", False) and pool.idle == 1
        assert pool._sweep is not None  # armed again for the one left
        assert pool.open == 1

    asyncio.run(go())


def test_at_the_cap_a_transaction_waits_for_a_session_to_end_and_gets_a_new_one() -> None:
    async def go() -> None:
        pool = make_pool(2)
        a, _ = await pool.acquire()
        b, _ = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await _turns()
        assert not waiting.done() and pool.open == 2
        a.close()  # its client session ended: the session is gone, its room is free
        c, reused = await waiting
        assert c is not a and c is not b and not reused  # never another client's session
        assert pool.open == 2 and len(pool.made) == 3  # type: ignore[attr-defined]

    asyncio.run(go())


def test_a_session_closed_while_held_frees_its_place_at_once() -> None:
    async def go() -> None:
        pool = make_pool(1)
        a, _ = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await _turns()
        assert not waiting.done()
        a.close()  # an error path closes it without giving it back
        c, reused = await waiting
        assert not reused and c is not a
        assert pool.open == 1

    asyncio.run(go())


def test_a_session_the_backend_closed_is_not_counted_when_the_cap_is_checked() -> None:
    async def go() -> None:
        pool = make_pool(1)
        a, _ = await pool.acquire()
        cast(FakeSession, a).peer_closed = True  # nobody has looked at it yet
        c, _ = await pool.acquire()
        assert c is not a and pool.open == 1

    asyncio.run(go())


def test_waiting_ends_with_backend_busy_after_the_wait() -> None:
    async def go() -> float:
        pool = make_pool(1, wait=0.2)
        await pool.acquire()
        start = time.monotonic()
        with pytest.raises(BackendBusy):
            await pool.acquire()
        return time.monotonic() - start

    assert 0.15 < asyncio.run(go()) < 2


def test_waiters_are_served_in_order_and_newcomers_queue_behind_them() -> None:
    async def go() -> list[int]:
        pool = make_pool(1)
        a, _ = await pool.acquire()
        served: list[int] = []
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(_use_once(pool, served, i)))
            await _turns()
        a.close()
        await asyncio.gather(*tasks)
        assert pool.open == 0 and len(pool.made) == 5  # type: ignore[attr-defined]
        return served

    assert asyncio.run(go()) == [0, 1, 2, 3]


def test_a_failed_connect_or_a_cancelled_waiter_passes_the_turn_on() -> None:
    async def go() -> None:
        pool = make_pool(1, fail=[BackendLost("refused")])
        with pytest.raises(BackendLost):
            await pool.acquire()
        assert pool.open == 0  # the failed connect holds no place
        a, _ = await pool.acquire()
        first = asyncio.create_task(pool.acquire())
        second = asyncio.create_task(pool.acquire())
        await _turns()
        first.cancel()  # its client went away while it waited
        await _turns()
        a.close()
        s, reused = await second
        assert not reused and s is not a
        assert first.cancelled()

    asyncio.run(go())


def test_a_waiter_woken_and_cancelled_before_it_ran_passes_the_wake_on() -> None:
    async def go() -> None:
        pool = make_pool(1, wait=1.0)
        a, _ = await pool.acquire()
        first = asyncio.create_task(pool.acquire())
        second = asyncio.create_task(pool.acquire())
        await _turns()
        a.close()  # wakes the first...
        first.cancel()  # ...which goes away before it could look
        s, reused = await second  # else: BackendBusy after the wait
        assert not reused and s is not a

    asyncio.run(go())


def test_a_newcomer_does_not_take_the_session_a_waiter_was_woken_for() -> None:
    async def go() -> list[str]:
        pool = make_pool(1)
        a, _ = await pool.acquire()
        order: list[str] = []
        waiters = [asyncio.create_task(_use_once(pool, order, n)) for n in ("first", "second")]
        await _turns()
        # Its first step runs before the woken waiter resumes.
        newcomer = asyncio.create_task(_use_once(pool, order, "newcomer"))
        a.close()
        await asyncio.gather(*waiters, newcomer)
        return order

    assert asyncio.run(go()) == ["first", "second", "newcomer"]
