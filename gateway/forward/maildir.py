"""The embedded backend: each accepted message lands atomically in a Maildir.

One file per recipient in `PATH/<domain>/<local>/new/`, written in `tmp/` and
renamed, so a reader never sees a half-written message. File I/O runs in a
thread: a slow disk must not stall every other session on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import time
from pathlib import Path

from gateway.forward.backend import ClientInfo, Transaction
from gateway.forward.client import SmtpReply
from gateway.wire import unstuff, unstuffed_pieces

_UNSAFE = re.compile(r"[^A-Za-z0-9_+=-]")
_counter = itertools.count()
# The longest mailbox path a delivery reply names.
_REPLY_PATH = 200


def _component(s: str) -> str:
    """A recipient part as a safe single path component (no '/', no '..')."""
    safe = _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", s)
    return safe or "%00"


def _sync_dir(path: Path) -> None:
    """The rename into new/ is a change to the directory: until the directory is
    synced, a crash right after our 250 can leave the message in tmp/, where no
    reader looks, or nowhere (the file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mailbox_dir(root: Path, rcpt: str) -> Path:
    local, at, domain = rcpt.rpartition("@")
    if not at:  # RFC 5321 4.5.1's bare <postmaster>: this host's, so under localhost
        local, domain = rcpt, "localhost"
    return root / _component(domain.lower()) / _component(local)


class MaildirTransaction:
    def __init__(self, backend: MaildirBackend, sender: str) -> None:
        self.backend = backend
        self.sender = sender
        self.recipients: list[str] = []

    async def rcpt(self, rcpt: str, params: list[str]) -> SmtpReply:
        self.recipients.append(rcpt)
        return SmtpReply(250, ["2.1.5 Recipient OK"])

    async def data(self, wire: bytes, recipients: int, prefix: bytes = b"") -> list[SmtpReply]:
        try:
            name = await asyncio.to_thread(self._deliver, wire, prefix)
        except OSError as e:
            return [SmtpReply(451, [f"4.3.0 Local delivery failed: {e.strerror}"])]
        return [SmtpReply(250, [f"2.0.0 Delivered as {self._written(name)}"])]

    def _written(self, base: str) -> str:
        """The file written, relative to the Maildir root (an operator finds it), or
        for several recipients the name each mailbox's file has."""
        if len(self.recipients) == 1:
            box = mailbox_dir(self.backend.root, self.recipients[0])
            path = str((box / "new" / f"{base}R0").relative_to(self.backend.root))
            # The path holds the recipient, escaped: a long one would make the reply
            # line longer than a client must accept (RFC 5321 4.5.3.1.5).
            return path if len(path) <= _REPLY_PATH else f"new/{base}R0"
        return f"new/{base}R0 to R{len(self.recipients) - 1} in {len(self.recipients)} mailboxes"

    def _deliver(self, wire: bytes, prefix: bytes) -> str:
        """In a thread: the message unstuffed a piece at a time (on the loop, the
        copies of a 25 MB message held every session for 100 ms), then written.
        Our fields end in CRLF, so the message begins a line."""
        message = [unstuff(prefix), *unstuffed_pieces(wire)]  # written piece by piece
        return self.backend.deliver(self.sender, self.recipients, message)

    async def finish(self) -> None:
        return None

    async def abort(self) -> None:
        return None


class MaildirBackend:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.host = socket.gethostname().replace("/", "_").replace(":", "_")

    @property
    def available(self) -> bool:
        return True

    def link(self) -> MaildirBackend:
        """Nothing is held per client session: the backend is its own link."""
        return self

    async def end(self) -> None:
        return None

    async def begin(
        self, client: ClientInfo, sender: str, params: list[str]
    ) -> tuple[SmtpReply, Transaction | None]:
        return SmtpReply(250, ["2.1.0 Sender OK"]), MaildirTransaction(self, sender)

    def deliver(self, sender: str, recipients: list[str], message: bytes | list[bytes]) -> str:
        now = time.time()
        base = f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{next(_counter)}.{self.host}"
        for i, rcpt in enumerate(recipients):
            box = mailbox_dir(self.root, rcpt)
            created = not (box / "new").is_dir()
            for sub in ("tmp", "new", "cur"):
                (box / sub).mkdir(parents=True, exist_ok=True)
            head = f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode(
                "utf-8", "surrogateescape"
            )
            name = f"{base}R{i}"
            tmp = box / "tmp" / name
            with open(tmp, "wb") as f:
                f.write(head)
                for piece in [message] if isinstance(message, bytes) else message:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, box / "new" / name)
            _sync_dir(box / "new")
            if created:  # a new mailbox: its own name, and its domain's, are new entries
                for parent in (box, box.parent, box.parent.parent):
                    _sync_dir(parent)
        return base

    async def close(self) -> None:
        return None
