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
