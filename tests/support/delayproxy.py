"""A loopback TCP proxy in front of a server, which can hold or delay what it
forwards: a slow or silent scanner (clamd, Rspamd) made from a real one.

    proxy = DelayProxy(("127.0.0.1", port))   # or DelayProxy("/path/to/unix.sock")
    proxy.endpoint                             # "tcp://127.0.0.1:<its port>"
    proxy.stall()          # from now on nothing is forwarded, either way ...
    proxy.wait_held()      # ... (blocks until a chunk is being held)
    proxy.resume()         # ... until this; held chunks then go on
    proxy.delay = 0.5      # or: every chunk waits this long (seconds) before it goes on
    proxy.connections      # connections accepted so far
    proxy.bytes_up         # bytes forwarded client -> server
    proxy.wait_connections(n)
    proxy.close()          # also as a context manager

It runs its own event loop in a thread, so tests driving a gateway in another
process (or synchronous clients) can use it. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.support.closing import Closing


class DelayProxy(Closing):
    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target
        self.delay = 0.0
        self.connections = 0
        self.bytes_up = 0
        self._held = threading.Event()
        self._accepted = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10) or self._server is None:
            raise RuntimeError("the delay proxy did not start")
        self.port = int(self._server.sockets[0].getsockname()[1])

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._flowing = asyncio.Event()
            self._flowing.set()
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self._loop.run_until_complete(start())
        started.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._accepted:
            self.connections += 1
            self._accepted.notify_all()
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(me)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                up_r, up_w = await asyncio.open_unix_connection(self.target)
            else:
                up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        up = asyncio.ensure_future(self._pump(reader, up_w, upstream=True))
        down = asyncio.ensure_future(self._pump(up_r, writer, upstream=False))
        self._tasks |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for t in (up, down):
            t.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        self._tasks -= {up, down}
        for w in (writer, up_w):
            w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        assert self._flowing is not None
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                if not self._flowing.is_set():
                    self._held.set()
                    await self._flowing.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                if upstream:
                    self.bytes_up += len(chunk)
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

    # -- the test's side (any thread) ------------------------------------------------
    def stall(self) -> None:
        """Hold every chunk from now on, either way, until resume()."""
        self._held.clear()
        assert self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        assert self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.set)

    def wait_held(self, timeout: float = 10) -> None:
        """Until a chunk arrived while stalled (and is being held)."""
        if not self._held.wait(timeout):
            raise TimeoutError("nothing reached the stalled proxy")

    def wait_connections(self, n: int, timeout: float = 10) -> None:
        with self._accepted:
            if not self._accepted.wait_for(lambda: self.connections >= n, timeout):
                raise TimeoutError(f"{self.connections} connections, not {n}")

    def close(self) -> None:
        if not self._loop.is_running():
            return

        async def stop() -> None:
            assert self._server is not None and self._flowing is not None
            self._server.close()
            self._flowing.set()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, *self._handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
