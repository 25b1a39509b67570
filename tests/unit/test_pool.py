"""The backend session pool's cap (backend.max_sessions): who waits, who gets the
session that comes free, and that no way of ending a session loses its place.
Fake sessions (pure logic); the real thing is in tests/integration/test_backend_limits.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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


def make_pool(max_open: int | None, wait: float = 5.0, fail: list[Exception] | None = None) -> Pool:
    made: list[FakeSession] = []

    async def factory() -> SmtpClient:
        if fail:
            raise fail.pop(0)
        s = FakeSession(len(made))
        made.append(s)
        return cast(SmtpClient, s)

    pool = Pool(factory, size=4, idle_timeout=30, label="t", max_open=max_open, wait=wait)
    pool.made = made  # type: ignore[attr-defined]
    return pool


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _use_once(pool: Pool, served: list[Any], name: Any) -> None:
    """Acquire, note the turn, hold the session a moment, give it back."""
    s, _ = await pool.acquire()
    served.append(name)
    await _turns(2)
    pool.release(s)


def test_without_a_cap_every_acquire_connects() -> None:
    async def go() -> int:
        pool = make_pool(None)
        sessions = [await pool.acquire() for _ in range(50)]
        assert all(not reused for _, reused in sessions)
        return pool.open

    assert asyncio.run(go()) == 50


def test_at_the_cap_a_transaction_waits_and_gets_the_released_session() -> None:
    async def go() -> None:
        pool = make_pool(2)
        a, _ = await pool.acquire()
        b, _ = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await _turns()
        assert not waiting.done() and pool.open == 2
        pool.release(a)  # clean: back to the pool, straight to the waiter
        c, reused = await waiting
        assert c is a and reused
        assert pool.open == 2 and len(pool.made) == 2  # type: ignore[attr-defined]
        pool.release(b)
        pool.release(c)

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
        pool.release(a)
        await asyncio.gather(*tasks)
        assert pool.open == 1 and len(pool.made) == 1  # type: ignore[attr-defined]
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
        pool.release(a)
        s, reused = await second
        assert reused and s is a
        assert first.cancelled()

    asyncio.run(go())


def test_a_waiter_woken_and_cancelled_before_it_ran_passes_the_wake_on() -> None:
    async def go() -> None:
        pool = make_pool(1, wait=1.0)
        a, _ = await pool.acquire()
        first = asyncio.create_task(pool.acquire())
        second = asyncio.create_task(pool.acquire())
        await _turns()
        pool.release(a)  # wakes the first...
        first.cancel()  # ...which goes away before it could look
        s, reused = await second  # else: BackendBusy after the wait
        assert reused and s is a

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
        pool.release(a)
        await asyncio.gather(*waiters, newcomer)
        return order

    assert asyncio.run(go()) == ["first", "second", "newcomer"]


def test_the_workers_share_max_sessions_rounded_up() -> None:
    from gateway import config
    from gateway.forward.backend import SmtpBackend

    def caps(max_sessions: int | None, workers: int) -> list[int | None]:
        cfg = config.Backend(url=["smtp://127.0.0.1:1", "smtp://127.0.0.1:2"])
        cfg = cfg.model_copy(update={"max_sessions": max_sessions})
        return [t.pool.max_open for t in SmtpBackend(cfg, "gw.test", workers).targets]

    assert caps(100, 1) == [100, 100]  # per target: each backend has its own limit
    assert caps(100, 3) == [34, 34]
    assert caps(1, 4) == [1, 1]  # never none at all
    assert caps(None, 2) == [None, None]
