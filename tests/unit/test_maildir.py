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
    base = backend.deliver("a@sender.test", ["x@example.test", "y@example.test"], b"S: x\r\n")
    for i, rcpt in enumerate(["x@example.test", "y@example.test"]):
        box = mailbox_dir(tmp_path, rcpt)
        assert (box / "new" / f"{base}R{i}").read_bytes().endswith(b"S: x\r\n")
        # The file (then still in tmp/), and new/ after the rename into it.
        assert synced[2 * i] == str(box / "tmp" / f"{base}R{i}")
        assert synced[2 * i + 1] == str(box / "new")
    assert len(synced) == 4
