"""The bytes of message data one process may hold at once.

The gateway is a before-queue proxy: it holds every message in memory from the
client's first DATA byte until the backend's final reply, where an MTA would
have spooled it to disk. Without a bound, a burst of large messages (or a
client that sends many slowly) takes the process past its memory limit, and
the kernel's OOM killer then ends every session at once. With this budget the
message that does not fit is refused with `452 4.3.1` (RFC 1870 6.1, RFC 3463
"mail system full") and retried by its client later, while the others go on.

The budget counts message bytes once. A message is briefly held about twice
over (the read buffer and its copy; checks that need the text unstuffed make
another): with eight 10 MB messages held at once, the process grew by 1.1 to
1.5 times the bytes counted. Hence the automatic budget is a quarter of the
memory the process may use, which leaves room for that and for the rest of the
process (about 60 MB).

A client that declares SIZE= (RFC 1870; MTAs do when the server offers SIZE)
is refused at MAIL when that does not fit in what is left, before it sends
anything. The SIZE= is checked, not reserved: a reservation would let any
client hold the budget with one MAIL line and no bytes, where now holding it
takes sending that many bytes.

Charging is cheap on the hot path: a message that arrives in the buffer whole
is charged once, at its size, and released once. Only a message that has to be
waited for is also charged as it grows, in steps of CHUNK bytes, so that many
concurrent transfers cannot together overshoot the budget, and one that cannot
fit is discarded as it arrives instead of being held to its end.
"""

from __future__ import annotations

import os
from pathlib import Path

# Reserved ahead of the bytes already read, so that a transfer asks once per
# CHUNK rather than once per network read.
CHUNK = 256 * 1024

# Part of the process's memory that message data may take (see the docstring).
AUTO_SHARE = 4


class MessageMemory:
    """The process's budget; one instance, shared by every session."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def available(self) -> int:
        return self.limit - self.used


class Reservation:
    """One transaction's share of the budget, grown while its message arrives and
    returned whole when the transaction ends. Releasing twice is harmless, so
    every way out of a transaction may release."""

    __slots__ = ("_memory", "held", "refused")

    def __init__(self, memory: MessageMemory) -> None:
        self._memory = memory
        self.held = 0
        self.refused = False  # grow() said no during this transfer (release() resets)

    def grow(self, size: int) -> bool:
        """Room for `size` bytes of this message (and CHUNK more, when there is
        room for it), or False: the budget cannot take them."""
        held = self.held
        if size <= held:
            return True
        mem = self._memory
        free = mem.limit - mem.used + held
        if size > free:
            self.refused = True
            return False
        want = min(size + CHUNK, free)
        mem.used += want - held
        self.held = want
        return True

    def fit(self, size: int) -> bool:
        """The message is read: hold exactly its size, or False if the budget
        cannot take it (then nothing is held)."""
        mem = self._memory
        if mem.used - self.held + size > mem.limit:
            self.release()
            return False
        mem.used += size - self.held
        self.held = size
        return True

    def release(self) -> None:
        self._memory.used -= self.held
        self.held = 0
        self.refused = False


def available_memory() -> int:
    """Bytes this process may use: the machine's memory, or the container's limit
    (cgroup v2 or v1) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 says so with a huge number
            total = min(total, int(text))
        break
    return total


def auto_limit(workers: int, max_message_size: int) -> int:
    """The budget of each of `workers` processes when the configuration leaves it
    to us: their share of AUTO_SHARE of the memory, never less than one message of
    the largest size allowed (else such a message could never be taken)."""
    return max(available_memory() // AUTO_SHARE // max(1, workers), max_message_size)
