"""ClamAV: the message sent to clamd with INSTREAM, a virus is `virus.found`.

The protocol (clamd(8)): `zINSTREAM\\0`, then the stream as chunks, each a 4-byte
big-endian length and that many bytes, ended by a zero-length chunk; the reply,
NUL-terminated, is `stream: OK`, `stream: <signature> FOUND`, or an error
ending in `ERROR` (`INSTREAM size limit exceeded. ERROR` past clamd's
StreamMaxLength, after which clamd closes the connection).

Connections are reused with IDSESSION: a connection starts with
`zIDSESSION\\0`, and then takes one command after another, each reply prefixed
by the command's number (`1: stream: OK`) until `zEND` or a close. Without it
clamd closes after every command, and each scan would pay a connect (and on TCP
the TIME_WAIT it leaves). clamd closes a session idle past its IdleTimeout
(default 30 s) and after an error reply; a kept connection it closed is
noticed at reuse, and the scan tried once more on a new one (scanner.py).

`max_size` (default 25 MiB, clamd's default StreamMaxLength) must not exceed
clamd's StreamMaxLength: a message between the two is sent, refused by clamd
with the size-limit error, and counted as `clamav.too_big` with a warning in
the log naming the mismatch.

The signature name is for operators: it goes to the facts (the transaction's
log line, `smtp-gateway check`), never into a metric label or the reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

from gateway.checks.scanner import (
    Connection,
    Scanner,
    ScannerOptions,
    ScannerProtocolError,
    ScannerRefused,
    ScannerUnavailable,
    ScanResult,
    scanner_symbols,
)
from gateway.context import Context

log = logging.getLogger("gateway.clamav")

# Bytes per INSTREAM chunk: the writes follow the transport's flow control, so
# no more than about this much of a message is copied at a time.
CHUNK = 64 * 1024
END = b"\0\0\0\0"
# A signature name longer than this is cut (it goes to the log line).
MAX_NAME = 200


class ClamavOptions(ScannerOptions):
    """Virus scanning by clamd (INSTREAM), once per message at DATA."""

    endpoint_schemes: ClassVar[frozenset[str]] = frozenset({"tcp", "unix"})

    # tcp://HOST:PORT (clamd's TCPSocket/TCPAddr) or unix:/PATH (its LocalSocket).
    endpoint: str = "tcp://127.0.0.1:3310"


def frames(message: bytes | memoryview, chunk: int = CHUNK) -> Iterator[bytes | memoryview]:
    """The INSTREAM body for `message`: each chunk's length then its bytes (views,
    not copies), and the zero-length end."""
    view = memoryview(message)
    for start in range(0, len(view), chunk):
        part = view[start : start + chunk]
        yield struct.pack(">I", len(part))
        yield part
    yield END


@dataclass(frozen=True, slots=True)
class Reply:
    kind: Literal["clean", "found", "size_limit", "error"]
    text: str  # the signature (found) or clamd's words (error)


_NUMBERED = re.compile(rb"^(\d+): ")


def parse_reply(raw: bytes, request: int | None) -> Reply:
    """One NUL-terminated reply of clamd. `request`: the command's number in an
    IDSESSION (its reply must carry it), None outside one.

    Raises ScannerProtocolError for anything else: a reply out of step (another
    number), or words clamd does not say."""
    body = raw.removesuffix(b"\0")
    if request is not None:
        m = _NUMBERED.match(body)
        if m is None or int(m.group(1)) != request:
            raise ScannerProtocolError(f"clamd reply out of step: {_show(body)}")
        body = body[m.end() :]
    if body == b"stream: OK":
        return Reply("clean", "")
    if body.startswith(b"stream: ") and body.endswith(b" FOUND"):
        name = body[len(b"stream: ") : -len(b" FOUND")].strip()
        if name:
            return Reply("found", _show(name, MAX_NAME))
    if body.startswith(b"INSTREAM size limit exceeded"):
        return Reply("size_limit", _show(body))
    if body.endswith(b"ERROR"):
        return Reply("error", _show(body))
    raise ScannerProtocolError(f"unexpected clamd reply: {_show(body)}")


async def _stream(w: asyncio.StreamWriter, message: bytes, replied: asyncio.Future[bytes]) -> bool:
    """Send a message of several chunks; whether all of it went out. Before each
    chunk, a turn of the loop: an answer that came in is read before a write can
    fail on clamd's close (the transport drops what it has not read when a write
    fails), and sending stops once clamd has answered."""
    for i, part in enumerate(frames(message)):
        if i % 2 == 0:
            await asyncio.sleep(0)
            if replied.done() or w.is_closing():
                return False
        w.write(part)
        await w.drain()
    return not w.is_closing()


def _show(raw: bytes, limit: int = 200) -> str:
    """Printable ASCII for logs: clamd's replies are, but nothing read from a socket
    is trusted to be."""
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in raw[:limit])


class ClamavCheck(Scanner):
    name: ClassVar[str] = "clamav"
    symbols: ClassVar[frozenset[str]] = frozenset({"virus.found"}) | scanner_symbols("clamav")
    options_type: ClassVar[type[ScannerOptions]] = ClamavOptions

    async def scan(self, ctx: Context, message: bytes, conn: Connection) -> ScanResult:
        request = int(conn.state.get("request", 0)) + 1
        conn.state["request"] = request
        w = conn.writer
        # The reply is read while the message is sent: clamd answers early and
        # closes past its StreamMaxLength, and a write failing on that close must
        # not hide the answer already received.
        replied = asyncio.ensure_future(conn.reader.readuntil(b"\0"))
        try:
            # A new connection opens its session with the first command, in one write.
            command = b"zIDSESSION\0zINSTREAM\0" if request == 1 else b"zINSTREAM\0"
            sent = False
            try:
                if len(message) <= CHUNK:
                    # Most mail: the command, the one chunk and the end in one write,
                    # one system call (a write each cost a third of the scan's CPU).
                    w.write(b"".join((command, *frames(message))))
                    await w.drain()
                    sent = not w.is_closing()
                else:
                    w.write(command)
                    sent = await _stream(w, message, replied)
            except ConnectionError:
                pass  # the answer, or the end of the connection, comes through `replied`
            try:
                raw = await replied
            except (ConnectionError, asyncio.IncompleteReadError):
                if sent:
                    raise
                raise ScannerUnavailable(
                    "clamd closed the connection while the message was sent (is"
                    " checks.clamav.max_size above its StreamMaxLength?)"
                ) from None
        except asyncio.LimitOverrunError:
            raise ScannerProtocolError("clamd reply too long") from None
        finally:
            if not replied.done():
                replied.cancel()
            elif not replied.cancelled():
                replied.exception()  # retrieved: no "never retrieved" noise on the way out
        reply = parse_reply(raw, request)
        if reply.kind == "clean":
            return ScanResult((), "clean")
        if reply.kind == "found":
            return ScanResult(("virus.found",), "infected", reply.text)
        conn.close()  # clamd ends the session after an error
        if reply.kind == "size_limit":
            # Not `too_big`: the message was within max_size and should have been
            # scanned; clamd's configuration stopped it. Unscanned mail must not pass
            # as if the policy had chosen so (clamav.too_big: accept): it is the
            # scanner failing, and the policy's clamav.unavailable decides.
            log.warning(
                "clamd refused a %d-byte message as over its StreamMaxLength: set"
                " clamd's StreamMaxLength above checks.clamav.max_size",
                len(message),
            )
            raise ScannerRefused(f"clamd: {reply.text} (StreamMaxLength)")
        raise ScannerRefused(f"clamd: {reply.text}")
