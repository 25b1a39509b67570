"""Warm backend sessions for one target, and a cap on how many are open.

A backend session carries exactly one client session (forward/link.py): once
the backend has been told who the client is (XCLIENT), that identity stays on
the connection (Postfix then stops offering XCLIENT, so it cannot be changed),
and a session handed to another client would carry the first one's address
into the second one's checks, logs and Received header. So a session leaves
this pool once, to one client session, and is closed when that client session
ends; it never comes back.

What pooling is still for is latency: connecting, the greeting and EHLO cost
three round trips and the backend's own session set-up. Up to `size` sessions
are kept connected and greeted ahead of need (spares); taking one starts the
connect of its replacement in the background. A spare unused for
`idle_timeout` is closed by a timer (not when someone next looks), so a
restarted backend is not counted as open long after, and so a quiet gateway
holds nothing at the backend.

The cap (`backend.max_sessions`) exists because a before-queue proxy holds a
backend session per client session with a transaction: at a peak, more than
the backend accepts. A backend at its limit answers 421 (Exim, Exchange) or
stops accepting; either way the transactions over the limit fail while the
backend is healthy. Under the cap they wait, first come first served, for a
session to end, up to the connect timeout, and only then fail (451 4.4.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from gateway import metrics
from gateway.forward.client import BackendBusy, BackendError, SmtpClient

log = logging.getLogger("gateway.backend")


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
        # Sessions handed out and not yet closed, and connects under way: with the
        # spares, what the backend sees open.
        self._busy: set[SmtpClient] = set()
        self._connecting = 0
        self._warming = 0  # of those connects, the ones that will become spares
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # A spare failed to open: no more until a client's own connect succeeds (a
        # backend at its connection limit, or down, is not hammered with spares).
        self._cold = False
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

    async def acquire(self, fresh: bool = False) -> tuple[SmtpClient, bool]:
        """A session for one client session, and whether it was a spare (connected
        earlier: it may have gone stale since). The caller closes it when its client
        session ends. BackendBusy if the cap leaves none within `wait` seconds.
        `fresh`: connect a new one (a spare just failed: the others may have died
        with it, a backend restart closing them all, before the loop has seen it)."""
        deadline: float | None = None
        if self._waiters and self.max_open is not None:
            # Nobody overtakes a transaction already waiting for a session.
            deadline = time.monotonic() + self.wait
            await self._wait_until(deadline, first=False)
        while True:
            spare = None if fresh else self._take_spare()
            if spare is not None:
                if deadline is not None:
                    self._waited.inc()
                return spare, True
            if self.max_open is None or self._room():
                break
            # Woken, but a newcomer took the room first: it keeps its place in line.
            first = deadline is not None
            if deadline is None:
                deadline = time.monotonic() + self.wait
            await self._wait_until(deadline, first)
        if deadline is not None:
            self._waited.inc()
        client = await self._connect()
        self._busy.add(client)
        self._cold = False
        self._refill()
        return client, False

    def _take_spare(self) -> SmtpClient | None:
        now = time.monotonic()
        while self._idle:
            client = self._idle.pop()  # the newest: the furthest from its idle timeout
            if not client.reusable or now - client.last_used > self.idle_timeout:
                client.close()  # dead or stale: detected here, before a client gets it
                continue
            client.stream.on_lost = None
            self._gauge.set(len(self._idle))
            self._busy.add(client)
            self._refill()
            return client
        self._gauge.set(0)
        return None

    async def _connect(self) -> SmtpClient:
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
        return client

    def _refill(self) -> list[asyncio.Task[None]]:
        """Start the connects that bring the spares back up to `size`, room allowing.
        Each counts as open (connecting) from now, so the cap holds."""
        started = []
        while (
            not self._closing
            and not self._cold
            and len(self._idle) + self._warming < self.size
            and (self.max_open is None or self.open < self.max_open)
            and not self._waiters
        ):
            self._warming += 1
            self._connecting += 1
            task = asyncio.get_running_loop().create_task(self._warm_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started.append(task)
        return started

    def warm(self) -> list[asyncio.Task[None]]:
        """Open the spares now (at start-up: the first greeting also tells the target's
        SIZE before the first client asks)."""
        return self._refill()

    async def _warm_one(self) -> None:
        try:
            client = await self._factory()
        except BackendError as e:
            log.debug("backend spare not opened: %s", e)
            self._cold = True
            if self._waiters:  # its room is free again
                self._wake()
            return
        finally:
            self._warming -= 1
            self._connecting -= 1
        client.on_close = self._closed
        if self._closing:
            client.close()
            return
        self._idle.append(client)
        client.stream.on_lost = lambda: self._spare_lost(client)
        self._gauge.set(len(self._idle))
        self._arm_sweep()
        if self._waiters:  # someone waiting for room: this spare is theirs
            self._wake()

    def _spare_lost(self, client: SmtpClient) -> None:
        """The backend closed a spare (restarted, or its own idle timeout)."""
        with contextlib.suppress(ValueError):
            self._idle.remove(client)
            self._gauge.set(len(self._idle))
        client.close()

    def _arm_sweep(self) -> None:
        if self._sweep is None and self._idle:
            oldest = min(c.last_used for c in self._idle)
            delay = max(0.0, oldest + self.idle_timeout - time.monotonic())
            self._sweep = asyncio.get_running_loop().call_later(delay + 0.01, self._expire)

    def _expire(self) -> None:
        """Close the spares idle for `idle_timeout`, politely (QUIT, no wait)."""
        self._sweep = None
        now = time.monotonic()
        keep: deque[SmtpClient] = deque()
        for client in self._idle:
            if now - client.last_used >= self.idle_timeout or not client.reusable:
                client.quit_now()
            else:
                keep.append(client)
        self._idle = keep
        self._gauge.set(len(keep))
        self._arm_sweep()

    def _room(self) -> bool:
        assert self.max_open is not None
        if self.open < self.max_open:
            return True
        # Sessions the backend closed while a client session held them count as
        # closed now, not when their holder next looks.
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

    async def close_all(self) -> None:
        self._closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for task in list(self._tasks):
            task.cancel()
        while self._idle:
            await self._idle.pop().quit()
        self._gauge.set(0)
