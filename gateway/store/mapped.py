"""A table file every worker of one machine maps into its memory, under a POSIX
record lock: what the rate limits (store/shared.py) and the greylist
(store/greylist_shared.py) keep their state in.

Why one definition: both tables are a header and then arrays of fixed-width
items, carved out of the same mapping in the same order by every worker; a
worker carving them at other offsets than its siblings would read their counts
as garbage. The lock and the way a key's text is kept for operators are the same
for both, for the reasons store/shared.py gives.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fcntl import LOCK_EX, LOCK_UN, lockf
from typing import Any

Region = Callable[[int, str, int], Any]


def open_table(path: str) -> tuple[int, mmap.mmap]:
    """The table file at `path`, opened for writing, and all of it mapped (shared:
    every worker's writes are every other's reads)."""
    fd = os.open(path, os.O_RDWR)
    return fd, mmap.mmap(fd, os.fstat(fd).st_size)


def carver(mm: mmap.mmap, at: int) -> Region:
    """region(n, fmt, width): the next n items of struct format `fmt`, each `width`
    bytes, from offset `at` on, one after another (views of the mapping, not copies).
    Typed Any: memoryview's typing knows only bytes."""
    view = memoryview(mm)

    def region(n: int, fmt: str, width: int) -> Any:
        nonlocal at
        part = view[at : at + n * width].cast(fmt)  # type: ignore[call-overload]
        at += n * width
        return part

    return region


@contextmanager
def locked(fd: int) -> Iterator[None]:
    """The table's record lock, held for the block (the kernel drops it if the
    holder dies)."""
    lockf(fd, LOCK_EX)
    try:
        yield
    finally:
        lockf(fd, LOCK_UN)


def put_text(keys: Any, slot: int, text: str, width: int) -> None:
    """Keep the first `width` bytes of `text` in `slot` of a region of bytes."""
    raw = text.encode()[:width]
    keys[slot * width : (slot + 1) * width] = raw.ljust(width, b"\0")


def get_text(keys: Any, slot: int, width: int) -> tuple[str, bool]:
    """The text kept in `slot`, and whether it was cut short."""
    raw = bytes(keys[slot * width : (slot + 1) * width]).rstrip(b"\0")
    return raw.decode("utf-8", "replace"), len(raw) == width
