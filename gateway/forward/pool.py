"""Reusable backend sessions for one target, and a cap on how many are open.

A session goes back to the pool only in a clean state: after a completed
transaction (no RSET needed, measured 7-19% faster than RSET every time) or
after an aborted one that the backend acknowledged with RSET.

The cap (`backend.max_sessions`) exists because a before-queue proxy opens a
backend session per client transaction: at a peak, more than the backend
accepts. A backend at its limit answers 421 (Exim, Exchange) or stops
accepting; either way the transactions over the limit fail while the backend
is healthy. Under the cap they wait, first come first served, for a session
to come free, up to the connect timeout, and only then fail (451 4.4.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

from gateway import metrics
from gateway.forward.client import BackendBusy, SmtpClient


class Pool:
    def __init__(
        self,
        factory: Callable[[], Awaitable[SmtpClient]],
        *,
        size: int,
        idle_timeout: float,
        label: str = "0",
        max_open: int | None = None,
        wait: float = 10.0,
    ) -> None:
        self._factory = factory
        self._gauge = metrics.child(metrics.BACKEND_POOL_IDLE, label)
        self._waited = metrics.child(metrics.BACKEND_SESSION_WAITS, label, "ok")
        self._waited_out = metrics.child(metrics.BACKEND_SESSION_WAITS, label, "timeout")
        self._idle: deque[SmtpClient] = deque()
        self.size = size
        self.idle_timeout = idle_timeout
        self.max_open = max_open  # None: no cap
        self.wait = wait
        # Sessions handed out and not yet back or closed, and connects under way:
        # with the idle ones, what the backend sees open.
        self._busy: set[SmtpClient] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._open_gauge = metrics.child(metrics.BACKEND_SESSIONS_OPEN, label)
        self._waiting_gauge = metrics.child(metrics.BACKEND_SESSION_WAITERS, label)
        metrics.sample(self._sample)

    def _sample(self) -> None:
        self._open_gauge.set(self.open)
        self._waiting_gauge.set(sum(1 for w in self._waiters if not w.done()))

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def open(self) -> int:
        return len(self._busy) + len(self._idle) + self._connecting

    async def acquire(self) -> tuple[SmtpClient, bool]:
        """A usable session and whether it was reused (a reused one may have gone
        stale). BackendBusy if the cap leaves none within `wait` seconds."""
        deadline: float | None = None
        if self._waiters and self.max_open is not None:
            # Nobody overtakes a transaction already waiting for a session.
            deadline = time.monotonic() + self.wait
            await self._wait_until(deadline, first=False)
        while True:
            now = time.monotonic()
            while self._idle:
                client = self._idle.pop()  # most recently used first: least likely timed out
                if not client.reusable or now - client.last_used > self.idle_timeout:
                    client.close()
                    continue
                self._gauge.set(len(self._idle))
                self._busy.add(client)
                if deadline is not None:
                    self._waited.inc()
                return client, True
            self._gauge.set(len(self._idle))
            if self.max_open is None or self._room():
                break
            # Woken, but a newcomer took the room first: it keeps its place in line.
            first = deadline is not None
            if deadline is None:
                deadline = now + self.wait
            await self._wait_until(deadline, first)
        if deadline is not None:
            self._waited.inc()
        self._connecting += 1
        try:
            client = await self._factory()
        except BaseException:
            self._connecting -= 1
            if self._waiters:  # a failed connect frees its room
                self._wake()
            raise
        self._connecting -= 1
        client.on_close = self._closed
        self._busy.add(client)
        return client, False

    def _room(self) -> bool:
        assert self.max_open is not None
        if self.open < self.max_open:
            return True
        # Sessions the backend closed while a transaction held them count as closed
        # now, not when their holder next looks.
        gone = [c for c in self._busy if c.closed]
        self._busy.difference_update(gone)
        return self.open < self.max_open

    async def _wait_until(self, deadline: float, first: bool) -> None:
        waiter = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await waiter
        except BaseException as e:
            if waiter.cancelled() or not waiter.done():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            else:
                self._wake()  # woken, but leaving without the room: the next one's turn
            if isinstance(e, TimeoutError):
                self._waited_out.inc()
                raise BackendBusy(
                    f"no backend session free within {self.wait:g} s"
                    f" (max_sessions: {self.max_open} here)"
                ) from None
            raise

    def _wake(self) -> None:
        """Room for one more: the longest waiter looks again."""
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _closed(self, client: SmtpClient) -> None:
        self._busy.discard(client)
        if self._waiters:
            self._wake()

    def release(self, client: SmtpClient) -> None:
        self._busy.discard(client)
        if not client.reusable or len(self._idle) >= self.size:
            client.close()
            return
        self._idle.append(client)
        # Evict from the cold end so idle sessions do not pile up at the backend.
        now = time.monotonic()
        while self._idle and now - self._idle[0].last_used > self.idle_timeout:
            self._idle.popleft().close()
        self._gauge.set(len(self._idle))
        if self._waiters:
            self._wake()

    async def close_all(self) -> None:
        while self._idle:
            await self._idle.pop().quit()
        self._gauge.set(0)
