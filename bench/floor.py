"""The design's floor: a relay with the gateway's own byte stream on uvloop, and nothing else.

Not a product and not used by the gateway: a yardstick for the benchmark's
`floor` mode. It keeps the gateway's before-queue semantics (MAIL, RCPT and the
message relayed to the backend one by one, each reply passed back, backend
connections pooled, no RSET after a completed transaction) and makes the same
system calls per message, but has no checks, metrics, headers, logs, limits,
timeouts or error handling. The gap between it and the `proxy` mode is the cost
of the gateway's own per-message Python work.

Usage: python bench/floor.py LISTEN_PORT BACKEND_PORT (loopback only)
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop

from gateway.smtp.protocol import Receiver
from gateway.stream import Stream

MAX_MESSAGE = 50_000_000


async def _reply(s: Stream) -> bytes:
    out = b""
    while True:
        line = await s.readline(4096)
        out += line + b"\r\n"
        if line[3:4] != b"-":
            return out


class Relay:
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.pool: list[Stream] = []

    async def _backend(self) -> Stream:
        if self.pool:
            return self.pool.pop()
        loop = asyncio.get_running_loop()
        _, b = await loop.create_connection(Stream, "127.0.0.1", self.backend_port)
        await _reply(b)
        b.write(b"EHLO floor\r\n")
        await _reply(b)
        return b

    async def session(self, c: Stream) -> None:
        c.write(b"220 floor ESMTP\r\n")
        b: Stream | None = None
        try:
            while True:
                line = await c.readline(1000)
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    c.write(b"250-floor\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    b = await self._backend()
                    b.write(line + b"\r\n")
                    c.write(await _reply(b))
                elif verb == b"RCPT" and b is not None:
                    b.write(line + b"\r\n")
                    c.write(await _reply(b))
                elif verb == b"DATA" and b is not None:
                    c.write(b"354 go ahead\r\n")
                    rx = Receiver(c.buffer)
                    rx.start_message(MAX_MESSAGE)
                    while (raw := rx.next_message()) is None:
                        await c.more()
                    b.write(b"DATA\r\n")
                    await _reply(b)
                    b.write((raw if isinstance(raw, bytes) else b"") + b".\r\n")
                    c.write(await _reply(b))
                    self.pool.append(b)
                    b = None
                elif verb == b"QUIT":
                    c.write(b"221 bye\r\n")
                    break
                else:
                    if b is not None:
                        b.write(b"RSET\r\n")
                        await _reply(b)
                        self.pool.append(b)
                        b = None
                    c.write(b"250 ok\r\n")
        except (ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            c.close()


async def main(port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(backend_port)
    sessions: set[asyncio.Task[None]] = set()

    def start(stream: Stream) -> None:
        task = loop.create_task(relay.session(stream))
        sessions.add(task)
        task.add_done_callback(sessions.discard)

    def factory() -> Stream:
        s = Stream(loop=loop)
        s.on_connect = start
        return s

    server = await loop.create_server(factory, "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
