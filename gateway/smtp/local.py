"""The gateway's own session, driven in memory: no socket, no backend process.

`LocalSession` runs the very `Session` the listeners run (smtp/session.py) over a
transport that keeps what the session writes, against a backend that accepts
every transaction (250) and keeps the message as it would have been relayed
(our header fields in front). A client's conversation is played one command at a
time, each after the reply to the one before, as a client that keeps to RFC 5321
would; every reply is the live one, word for word.

Two users: `smtp-gateway check`, which shows an operator what the gateway would
answer (it cannot disagree with a real session: it is one), and the unit tests
of the session, which need no process and no socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from gateway import config
from gateway.checks.relay import RelayCheck
from gateway.forward.backend import ClientInfo
from gateway.forward.client import SmtpReply
from gateway.net import network_matcher
from gateway.pipeline.runner import Runner
from gateway.smtp.memory import MessageMemory
from gateway.smtp.services import ListenerState, Services, ehlo_lines
from gateway.smtp.session import Session
from gateway.stream import Stream


class MemoryTransport(asyncio.Transport):
    """A transport whose peer is the driver: writes are kept, closing is noted."""

    def __init__(self, stream: Stream, peer: tuple[str, int]) -> None:
        super().__init__()
        self._stream = stream
        self._peer = peer
        self._closing = False
        self.written = bytearray()
        self.wrote = asyncio.Event()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self._peer, "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        self.wrote.set()

    def writelines(self, chunks: Any) -> None:
        for c in chunks:
            self.write(c)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.wrote.set()
            asyncio.get_running_loop().call_soon(self._stream.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False


@dataclass
class Relayed:
    """What the accepting backend received in one transaction."""

    sender: str
    recipients: list[str] = field(default_factory=list)
    prefix: bytes = b""  # the header fields the gateway put in front of the message
    message: bytes = b""  # the client's message as relayed (wire form)


_OK = SmtpReply(250, ["2.0.0 Ok"])


class _AcceptingTransaction:
    def __init__(self, relayed: Relayed) -> None:
        self.relayed = relayed

    async def _ok(self) -> SmtpReply:
        return _OK

    def rcpt(self, rcpt: str, params: list[str]) -> Awaitable[SmtpReply]:
        self.relayed.recipients.append(rcpt)
        return self._ok()

    async def _data(self, wire: bytes, recipients: int, prefix: bytes) -> list[SmtpReply]:
        self.relayed.prefix, self.relayed.message = prefix, wire
        return [SmtpReply(250, ["2.0.0 Ok: queued"])]

    def data(self, wire: bytes, recipients: int, prefix: bytes = b"") -> Awaitable[list[SmtpReply]]:
        return self._data(wire, recipients, prefix)

    async def finish(self) -> None:
        pass

    async def abort(self) -> None:
        pass


class _AcceptingLink:
    def __init__(self, backend: AcceptingBackend) -> None:
        self.backend = backend

    async def _begin(self, sender: str) -> tuple[SmtpReply, _AcceptingTransaction]:
        relayed = Relayed(sender)
        self.backend.relayed.append(relayed)
        return SmtpReply(250, ["2.1.0 Ok"]), _AcceptingTransaction(relayed)

    def begin(
        self, client: ClientInfo, sender: str, params: list[str]
    ) -> Awaitable[tuple[SmtpReply, _AcceptingTransaction]]:
        return self._begin(sender)

    async def end(self) -> None:
        pass


class AcceptingBackend:
    """A backend that accepts everything and keeps what it was sent."""

    def __init__(self) -> None:
        self.relayed: list[Relayed] = []

    def link(self) -> _AcceptingLink:
        return _AcceptingLink(self)

    @property
    def available(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def services(settings: config.Settings, runner: Runner, backend: AcceptingBackend) -> Services:
    """What the app builds for its sessions (app.App), with the accepting backend."""
    return Services(
        settings=settings,
        runner=runner,
        backend=backend,
        is_trusted=network_matcher(settings.trusted_networks),
        is_proxy=network_matcher(settings.proxy_networks),
        is_local=RelayCheck(settings.local_domains).is_local,
        memory=MessageMemory(4 * settings.limits.max_message_size),
        max_size=settings.limits.max_message_size,
    )


def plain_listener(settings: config.Settings, svc: Services) -> ListenerState:
    """A listener as the first configured one, minus TLS and PROXY (the session in
    memory is a plaintext client speaking directly)."""
    first = settings.listeners[0] if settings.listeners else config.Listener()
    cfg = first.model_copy(
        update={
            "tls": config.TlsMode.NONE,
            "require_tls": False,
            "proxy_protocol": False,
            "cert_file": None,
            "key_file": None,
            "certificates": [],
        }
    )
    state = ListenerState(cfg=cfg, tls=None)
    state.ehlo_plain = ehlo_lines(settings, cfg, False, svc.max_size)
    return state


class LocalSession:
    """One client session against `svc`, played command by command.

    `await send(line)` writes one command and returns the reply's lines (the
    gateway's wire text, CRLF removed); `message(data)` sends a message after a
    354 the same way. `closed` is true once the gateway ended the session."""

    def __init__(
        self, svc: Services, listener: ListenerState, client: tuple[str, int] = ("127.0.0.1", 1)
    ) -> None:
        self.stream = Stream()
        self.transport = MemoryTransport(self.stream, client)
        self.stream.connection_made(self.transport)
        self.session = Session(svc, listener, self.stream)
        self._read = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self.transport.is_closing()

    async def start(self) -> list[str]:
        """Run the session; its greeting (or its refusal at connect)."""
        self.task = asyncio.get_running_loop().create_task(self.session.run())
        return await self._reply()

    async def send(self, line: str | bytes) -> list[str]:
        data = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
        self.stream.data_received(data + b"\r\n")
        return await self._reply()

    async def message(self, wire: bytes) -> list[str]:
        """A message in wire form (dot-stuffed, CRLF lines), the final dot added."""
        self.stream.data_received(wire + b".\r\n")
        return await self._reply()

    async def _reply(self) -> list[str]:
        """The next complete reply: lines up to one whose fourth character is a space."""
        while True:
            out = self.transport.written
            end = _reply_end(out, self._read)
            if end is not None:
                text = bytes(out[self._read : end]).decode("utf-8", "replace")
                self._read = end
                return text.split("\r\n")[:-1]
            if self.closed and (self.task is None or self.task.done()):
                return []
            self.transport.wrote.clear()
            waiter = asyncio.ensure_future(self.transport.wrote.wait())
            done = self.task if self.task is not None else waiter
            await asyncio.wait({waiter, done}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def close(self) -> None:
        """End the session as a client that hangs up would."""
        if not self.closed:
            self.transport.close()
        if self.task is not None:
            await self.task


def _reply_end(buf: bytearray, start: int) -> int | None:
    """Where the complete reply starting at `start` ends (after its last CRLF)."""
    pos = start
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        if (nl - pos >= 4 and buf[pos + 3 : pos + 4] == b" ") or nl - pos == 3:
            return nl + 2
        pos = nl + 2
