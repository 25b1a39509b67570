"""The mapped table both shared stores keep their state in (gateway/store/mapped.py):
regions carved one after another, writes one mapping makes seen by another, the
record lock keeping out another process, and the key text kept for operators."""

from __future__ import annotations

import os
import struct
from fcntl import LOCK_EX, LOCK_NB, lockf
from pathlib import Path

from gateway.store.mapped import carver, get_text, locked, open_table, put_text


def _table(tmp_path: Path, size: int) -> str:
    path = str(tmp_path / "t.table")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_regions_follow_the_header_one_after_another(tmp_path: Path) -> None:
    path = _table(tmp_path, 16 + 2 * 8 + 3 * 4)
    _, mm = open_table(path)
    region = carver(mm, 16)
    first, second = region(2, "Q", 8), region(3, "i", 4)
    first[1] = 7
    second[0] = -1
    second[2] = 9
    assert (len(first), len(second)) == (2, 3)
    raw = Path(path).read_bytes()
    assert raw[:16] == bytes(16)  # the header is left alone
    assert struct.unpack_from("<QQ", raw, 16) == (0, 7)
    assert struct.unpack_from("<iii", raw, 32) == (-1, 0, 9)


def test_two_mappings_of_one_table_see_each_others_writes(tmp_path: Path) -> None:
    """What every worker relies on: its sibling's counts are in its own mapping."""
    path = _table(tmp_path, 8 * 4)
    _, mine = open_table(path)
    _, theirs = open_table(path)
    carver(mine, 0)(4, "d", 8)[3] = 2.5
    assert carver(theirs, 0)(4, "d", 8)[3] == 2.5


def _another_process_can_lock(path: str) -> bool:
    """Whether a forked process (record locks are not inherited) takes the lock now."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        fd = os.open(path, os.O_RDWR)
        try:
            lockf(fd, LOCK_EX | LOCK_NB)
        except OSError:
            os._exit(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_the_lock_keeps_other_processes_out_until_the_block_ends(tmp_path: Path) -> None:
    path = _table(tmp_path, 64)
    fd, _ = open_table(path)
    with locked(fd):
        assert not _another_process_can_lock(path)
    assert _another_process_can_lock(path)


def test_a_key_text_is_kept_whole_or_cut_and_said_to_be_cut(tmp_path: Path) -> None:
    _, mm = open_table(_table(tmp_path, 3 * 8))
    keys = carver(mm, 0)(3 * 8, "B", 1)
    put_text(keys, 0, "short", 8)
    put_text(keys, 1, "longer than eight", 8)
    assert get_text(keys, 0, 8) == ("short", False)
    assert get_text(keys, 1, 8) == ("longer t", True)
    assert get_text(keys, 2, 8) == ("", False)
    put_text(keys, 1, "ab", 8)  # a shorter key over a longer one leaves none of it
    assert get_text(keys, 1, 8) == ("ab", False)
