"""The embedded maildir backend: what it makes durable before the 250."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.forward.maildir import MaildirBackend, mailbox_dir


def test_the_file_and_the_rename_are_synced_before_delivery_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    backend = MaildirBackend(str(tmp_path))
    rcpts = ["x@example.test", "y@example.test"]
    mailbox_dir(tmp_path, rcpts[1]).joinpath("new").mkdir(parents=True)  # y's exists
    base = backend.deliver("a@sender.test", rcpts, b"S: x\r\n")
    x, y = (mailbox_dir(tmp_path, r) for r in rcpts)
    for i, box in enumerate((x, y)):
        assert (box / "new" / f"{base}R{i}").read_bytes().endswith(b"S: x\r\n")
    assert synced == [
        # The file (then still in tmp/), new/ after the rename into it, and for a
        # mailbox made now, the directories that gained an entry.
        str(x / "tmp" / f"{base}R0"), str(x / "new"), str(x), str(x.parent), str(tmp_path),
        str(y / "tmp" / f"{base}R1"), str(y / "new"),
    ]  # fmt: skip


def test_the_reply_names_the_file_written(tmp_path: Path) -> None:
    """The operator trying the gateway finds the message from the reply alone."""
    import asyncio

    async def deliver(rcpts: list[str]) -> str:
        backend = MaildirBackend(str(tmp_path))
        _reply, txn = await backend.begin(None, "a@sender.test", [])  # type: ignore[arg-type]
        assert txn is not None
        for r in rcpts:
            await txn.rcpt(r, [])
        [reply] = await txn.data(b"Subject: s\r\n\r\nhi\r\n", len(rcpts))
        return str(reply)

    one = asyncio.run(deliver(["x@example.test"]))
    [f] = (tmp_path / "example%2Etest" / "x" / "new").iterdir()
    assert one == f"250 2.0.0 Delivered as example%2Etest/x/new/{f.name}"
    two = asyncio.run(deliver(["y@example.test", "z@example.test"]))
    [g] = (tmp_path / "example%2Etest" / "z" / "new").iterdir()
    base = g.name.removesuffix("R1")
    assert two == f"250 2.0.0 Delivered as new/{base}R0 to R1 in 2 mailboxes"


def test_a_long_recipient_does_not_make_the_reply_line_too_long(tmp_path: Path) -> None:
    import asyncio

    async def deliver() -> str:
        backend = MaildirBackend(str(tmp_path))
        _reply, txn = await backend.begin(None, "a@sender.test", [])  # type: ignore[arg-type]
        assert txn is not None
        await txn.rcpt("\u00fc" * 64 + "@example.test", [])
        [reply] = await txn.data(b"Subject: s\r\n\r\nhi\r\n", 1)
        return str(reply)

    reply = asyncio.run(deliver())
    [box] = (tmp_path / "example%2Etest").iterdir()
    [f] = (box / "new").iterdir()
    assert reply == f"250 2.0.0 Delivered as new/{f.name}" and len(reply) < 512
