"""One buffered byte stream for both SMTP sides (client-facing and backend).

The transport adapter: bytes arrive, wait with a deadline, flow control, TLS,
writes. Framing the client's commands and DATA is the protocol's job
(smtp/protocol.py Receiver, over `buffer`); the line reads here serve the
backend's replies and the PROXY header.

Why our own instead of asyncio streams: we need to (a) find the end-of-data
marker in bulk across the whole buffer, (b) throw away pipelined plaintext at
STARTTLS (the command-injection class), and (c) bound the buffer per state.
asyncio's StreamReader hides its buffer and is line-oriented; this class keeps
the buffer ours, with the same flow-control contract (pause reading past a
high-water mark).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

_GRAIN = 1.0  # seconds: the coarsest rounding of a read deadline


class StreamClosed(ConnectionError):
    """The peer went away before the bytes we waited for arrived."""


class LineTooLong(ValueError):
    """A command line exceeded the limit; the excess up to CRLF was discarded."""


class Stream(asyncio.Protocol):
    """A protocol that buffers what arrives and lets one coroutine read it."""

    __slots__ = (
        "_buf",
        "_closed",
        "_deadline",
        "_drain_waiter",
        "_eof",
        "_high_water",
        "_loop",
        "_paused",
        "_timer",
        "_timer_at",
        "_waiter",
        "_write_paused",
        "on_connect",
        "on_lost",
        "peername",
        "tls_object",
        "transport",
    )

    def __init__(
        self, high_water: int = 256 * 1024, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._buf = bytearray()
        # Cached: every asyncio.get_running_loop() costs a getpid() system call.
        self._loop: asyncio.AbstractEventLoop | None = loop
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._closed: asyncio.Future[None] | None = None
        self._high_water = high_water
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.peername: Any = None
        self.tls_object: ssl.SSLObject | None = None
        # Server side: called once the connection exists, to start its session.
        self.on_connect: Callable[[Stream], None] | None = None
        # Called once when the connection is gone (a pool's idle session, closed by
        # its peer, leaves the pool at once rather than when someone next looks).
        self.on_lost: Callable[[], None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peername = transport.get_extra_info("peername")
        self.tls_object = transport.get_extra_info("ssl_object")
        if self.on_connect is not None:
            self.on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self._high_water and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:  # a closed stream must not stay referenced by a timer
            self._timer.cancel()
            self._timer = self._timer_at = None
        self._eof = True
        self._wake()
        self.resume_writing()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        told, self.on_lost = self.on_lost, None
        if told is not None:
            told()

    # -- reading --------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def set_deadline(self, seconds: float | None) -> None:
        """Every read until the next call must finish within `seconds` from now.

        The deadline is rounded up to a grain of at most a second (an eighth of
        `seconds` for short ones), so that the commands of a session share one
        timer: arming and cancelling a timer per read cost 6% of a small
        message's CPU. A timeout may so fire up to one grain late, never early.
        """
        if seconds is None:
            self._deadline = None
            return
        grain = seconds / 8
        if grain > _GRAIN or not grain:
            grain = _GRAIN
        # -(-x // g): the next multiple of the grain, without two calls (min, ceil)
        # on a path taken before every command.
        deadline = -(-((self._loop or self.loop).time() + seconds) // grain) * grain
        self._deadline = deadline
        w = self._waiter
        if w is not None and not w.done() and (self._timer_at is None or deadline < self._timer_at):
            self._arm(deadline)  # set or moved earlier during a wait: the timer must follow

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = (self._loop or self.loop).call_at(deadline, self._expire)
        self._timer_at = deadline

    def _expire(self) -> None:
        self._timer = self._timer_at = None
        w = self._waiter
        if w is None or w.done() or self._deadline is None:
            return
        if (self._loop or self.loop).time() >= self._deadline:
            self._waiter = None
            w.set_exception(TimeoutError())
        else:  # the deadline moved later while this wait was pending
            self._arm(self._deadline)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def more(self) -> asyncio.Future[None]:
        """What to await for more bytes (or EOF); TimeoutError past the deadline.

        A plain function returning the future, not a coroutine: every wait of a
        session resumes through each coroutine frame above it, and this keeps one
        frame (and one coroutine object per wait) off all of them. Whoever completes
        the future also clears `_waiter`; a cancelled wait leaves it behind, done,
        which every user of `_waiter` treats as no wait.
        """
        if self._eof:
            raise StreamClosed("connection closed by peer")
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = self._loop or self.loop
        deadline = self._deadline
        if deadline is not None:
            if loop.time() >= deadline:
                raise TimeoutError
            at = self._timer_at
            if at is None or deadline < at:
                # A timer set for a later deadline is moved; one set earlier stays
                # and re-arms itself when it fires (_expire): a deadline that moves
                # later (DATA's longer timeout, the next command) costs nothing.
                self._arm(deadline)
        self._waiter = waiter = loop.create_future()
        return waiter

    @property
    def buffer(self) -> bytearray:
        """What arrived and nobody has taken yet: the server session's protocol
        (smtp/protocol.py Receiver) frames it in place, with no copy between them."""
        return self._buf

    def set_high_water(self, n: int) -> None:
        self._high_water = n

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    def take_line(self, limit: int) -> bytes | None:
        """A line already buffered, as readline returns it; None if none is complete.

        Synchronous, for the common case of a line that is already here (pipelined
        commands, a reply read along with the previous one): no coroutine at all.
        """
        buf = self._buf
        i = buf.find(b"\r\n")
        if i < 0:
            return None
        if i > limit:
            del buf[: i + 2]
            raise LineTooLong
        line = bytes(memoryview(buf)[:i])
        del buf[: i + 2]
        return line

    def wait_line(self, limit: int) -> Awaitable[None]:
        """What to await before `take_line` again (readline's loop, and the hot
        callers that run it inline to spare a coroutine frame per wait): the plain
        future of `more`, or, past `limit`, the wait that discards the rest of the
        line and raises LineTooLong."""
        if len(self._buf) > limit + 1:
            return self._too_long()
        return self.more()

    async def _too_long(self) -> None:
        await self._discard_line()
        raise LineTooLong

    async def readline(self, limit: int) -> bytes:
        """Return one CRLF-terminated line without the CRLF.

        Only CRLF ends a line: a bare LF stays inside it, so the caller can
        refuse it instead of treating it as a command boundary.
        """
        line = self.take_line(limit)
        while line is None:
            await self.wait_line(limit)
            line = self.take_line(limit)
        return line

    async def _discard_line(self) -> None:
        buf = self._buf
        while True:
            i = buf.find(b"\r\n")
            if i >= 0:
                del buf[: i + 2]
                return
            keep = buf[-1:] if buf.endswith(b"\r") else b""
            buf.clear()
            buf += keep
            await self.more()

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self.more()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def peek(self, n: int) -> bytes:
        """At least min(n, what the peer sends before EOF) bytes, not consumed."""
        while len(self._buf) < n and not self._eof:
            await self.more()
        return bytes(self._buf[:n])

    @property
    def pending(self) -> int:
        """Bytes the peer sent that nobody has read yet."""
        return len(self._buf)

    async def wait_input(self, seconds: float) -> bool:
        """Whether the peer sends anything within `seconds` (StreamClosed if it
        closes instead). Replaces any deadline set before."""
        self.set_deadline(seconds)
        try:
            while not self._buf:
                await self.more()
        except TimeoutError:
            return False
        return True

    def discard_buffer(self) -> int:
        """Drop everything buffered (pipelined plaintext before a TLS upgrade)."""
        n = len(self._buf)
        self._buf.clear()
        return n

    # -- writing --------------------------------------------------------------
    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        """Several buffers in one go, without joining them first (a large message
        is not copied again to put our headers in front of it)."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.writelines(parts)

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is above its high-water mark (the peer is not reading)."""
        return self._write_paused

    async def drain(self) -> None:
        """Back-pressure for large writes, driven by the transport's watermarks."""
        t = self.transport
        if t is None or t.is_closing():
            raise StreamClosed("connection closed")
        if self._write_paused:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
            if t.is_closing():
                raise StreamClosed("connection closed")

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()

    async def wait_closed(self) -> None:
        if self.transport is None or (self._eof and self.transport.is_closing()):
            return
        if self._closed is None:
            self._closed = self.loop.create_future()
        await self._closed

    async def start_tls(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        keep_buffer: bool = False,
        handshake_timeout: float = 30.0,
    ) -> None:
        """Upgrade in place. STARTTLS discards what was buffered before the handshake
        (pipelined plaintext: the command-injection class); implicit TLS keeps it
        (`keep_buffer`): those bytes are the start of the client's handshake, read
        along with a PROXY header or before the session got to run."""
        assert self.transport is not None
        # Nothing more may reach this protocol: from here on the TLS layer reads.
        self.transport.pause_reading()
        early = bytes(self._buf) if keep_buffer else b""
        self.discard_buffer()
        loop = self.loop
        task = loop.create_task(
            loop.start_tls(
                self.transport,
                self,
                ctx,
                server_side=server_side,
                server_hostname=server_hostname,
                ssl_handshake_timeout=handshake_timeout,
            )
        )
        if early:
            # start_tls installs the TLS protocol and queues its connection_made in
            # its first step; two call_soon hops later, that has run and the early
            # bytes go in ahead of anything still in the socket.
            transport = self.transport

            def feed() -> None:
                proto: Any = transport.get_protocol()
                if proto is self or task.done():
                    return
                if hasattr(proto, "get_buffer"):
                    view = proto.get_buffer(len(early))
                    n = min(len(view), len(early))
                    view[:n] = early[:n]
                    proto.buffer_updated(n)
                else:
                    proto.data_received(early)

            loop.call_soon(loop.call_soon, feed)
        new = await task
        if new is None:
            raise StreamClosed("TLS upgrade failed")
        self.transport = new
        self._paused = False
        self.tls_object = new.get_extra_info("ssl_object")
