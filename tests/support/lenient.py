"""A deliberately lenient SMTP backend on raw sockets: it ends DATA at a lone "." line
whatever the line ending (`\\n.\\n`, `\\r\\n.\\n`, ...), as some real MTAs do, and then
reads whatever follows as new commands. It is the backend that SMTP smuggling
exploits; the gateway must make sure it never sees two messages for one.

With `extra_after` ("MAIL", or "." for the end of DATA) it also misbehaves the
other way: after its reply to that command it sends one more reply that nothing
asked for, which puts every later reply one behind its command. With
`refuse_early` it refuses every message after its first line, then closes, as
some servers do with a message too big for them.

Spool format as tests/support/backend.py (msg-N.json, commands.log).
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

EXTRA = b"250 2.0.0 unrequested\r\n"


class Lenient:
    def __init__(
        self, spool: Path, extra_after: str | None = None, refuse_early: bool = False
    ) -> None:
        self.spool = spool
        self.extra_after = extra_after
        self.refuse_early = refuse_early
        spool.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.log = open(spool / "commands.log", "a", buffering=1)  # noqa: SIM115

    def _extra(self, after: str) -> bytes:
        """The unrequested reply, in the same write as the requested one: one segment,
        so the gateway has both the moment it reads the first (no race in the tests)."""
        return EXTRA if after == self.extra_after else b""

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lenient.test ESMTP\r\n")
        mail_from, rcpts = "", []
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                cmd = line.rstrip(b"\r\n").decode("latin-1")
                verb = cmd[:4].upper()
                self.log.write(cmd + "\n")
                if verb in ("EHLO", "HELO", "LHLO"):
                    writer.write(b"250-lenient.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == "MAIL":
                    mail_from, rcpts = cmd[10:].strip().strip("<>").split(">")[0], []
                    writer.write(b"250 2.1.0 ok\r\n" + self._extra(verb))
                elif verb == "RCPT":
                    rcpts.append(cmd[8:].strip().strip("<>").split(">")[0])
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    if self.refuse_early:
                        await reader.readline()
                        writer.write(b"552 5.3.4 message too big for this backend\r\n")
                        await writer.drain()
                        return
                    body = b""
                    while True:
                        # Lenient: any line that is "." ends the data (bare LF counts).
                        part = await reader.readline()
                        if not part:
                            return
                        if part.rstrip(b"\r\n") == b"." or part == b".\r":
                            break
                        body += part
                    self.count += 1
                    rec = {"mail_from": mail_from, "rcpt_tos": rcpts,
                           "data": base64.b64encode(body).decode()}  # fmt: skip
                    (self.spool / f"msg-{self.count:05d}.json").write_text(json.dumps(rec))
                    queued = f"250 2.0.0 queued as L{self.count}\r\n".encode()
                    writer.write(queued + self._extra("."))
                elif verb == "RSET":
                    mail_from, rcpts = "", []
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()


async def serve(
    port: int, spool: Path, extra_after: str | None = None, refuse_early: bool = False
) -> None:
    handler = Lenient(spool, extra_after, refuse_early)
    server = await asyncio.start_server(handler.session, "127.0.0.1", port)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()
