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

A MAIL is admitted when what it declares with SIZE= (RFC 1870; MTAs declare
it when the server offers SIZE) fits in what is left, or, without SIZE=, when
anything is left. A MAIL that does not fit waits for room, first come first
served, for up to `limits.data_memory_wait` seconds, and only then gets
`452 4.3.1`: at a peak, a client that waits some seconds is delivered, where
one refused would retry only after minutes. An admitted SIZE= is pledged to
its transaction, so that the room freed by one message is not promised to
every waiter at once (each would then send its message only to have it
refused at its end); the message's bytes take the pledge's place as they
arrive. A pledge lapses after the same number of seconds if no byte came, so
that a client cannot hold the budget with one MAIL line and no bytes for
longer than that: past it, its message is charged only as it arrives, like one
without SIZE=. With the wait at 0, nothing waits and nothing is pledged.

Charging is cheap on the hot path: a message that arrives in the buffer whole
is charged once, at its size, and released once. Only a message that has to be
waited for is also charged as it grows, in steps of CHUNK bytes, so that many
concurrent transfers cannot together overshoot the budget, and one that cannot
fit is discarded as it arrives instead of being held to its end.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from pathlib import Path

# Reserved ahead of the bytes already read, so that a transfer asks once per
# CHUNK rather than once per network read.
CHUNK = 256 * 1024

# Part of the process's memory that message data may take (see the docstring).
AUTO_SHARE = 4


class MessageMemory:
    """The process's budget; one instance, shared by every session."""

    __slots__ = ("_pledges", "_waiters", "limit", "pledged", "used", "wait")

    def __init__(self, limit: int, wait: float = 0.0) -> None:
        self.limit = limit
        self.used = 0  # bytes of message data held
        self.pledged = 0  # bytes declared by admitted MAILs whose data has not come yet
        self.wait = wait  # limits.data_memory_wait: how long a MAIL waits, a pledge lasts
        # Holders of a pledge, with the time it lapses: oldest first (one wait for all).
        self._pledges: dict[Reservation, float] = {}
        self._waiters: deque[_Waiter] = deque()

    @property
    def available(self) -> int:
        """What a MAIL may still be admitted for: neither held nor pledged."""
        return self.limit - self.used - self.pledged

    def counted(self) -> int:
        """What the budget counts now, held and pledged (for the gauge; drops the
        pledges whose time has passed first)."""
        self.lapse(time.monotonic())
        return self.used + self.pledged

    @property
    def waiting(self) -> int:
        """MAILs waiting for room."""
        return len(self._waiters)

    def fits(self, size: int) -> bool:
        """Room for a MAIL that declared `size` (0: none declared, any room will do)."""
        room = self.available
        if (size > room or room <= 0) and self._pledges:
            self.lapse(time.monotonic())
            room = self.available
        return size <= room and room > 0

    def lapse(self, now: float) -> None:
        """Drop the pledges whose time has passed (lazily: when room is looked for
        and when the gauges are sampled)."""
        pledges = self._pledges
        while pledges:
            holder, until = next(iter(pledges.items()))
            if until > now:
                return
            holder.unpledge()

    def _next_lapse(self) -> float | None:
        return next(iter(self._pledges.values()), None)

    def wake(self, turn: bool = False) -> None:
        """Room came free: the longest waiter looks, if it now fits (strictly in
        turn: a large declared size is not overtaken by smaller ones). `turn`: the
        line moved, and the new first looks in any case, to watch the pledges lapse
        (only the first in line does)."""
        if self._waiters:
            head = self._waiters[0]
            if not head.woken.done() and (turn or self.fits(head.size)):
                head.woken.set_result(None)


class _Waiter:
    __slots__ = ("size", "woken")

    def __init__(self, size: int, woken: asyncio.Future[None]) -> None:
        self.size = size
        self.woken = woken


class Reservation:
    """One transaction's share of the budget: a pledge from MAIL, then the bytes
    of its message as they arrive, all returned when the transaction ends.
    Releasing twice is harmless, so every way out of a transaction may release."""

    __slots__ = ("_memory", "held", "pledge")

    def __init__(self, memory: MessageMemory) -> None:
        self._memory = memory
        self.held = 0
        self.pledge = 0  # SIZE= pledged at MAIL, until the message's bytes take its place

    # -- at MAIL --------------------------------------------------------------
    def admit(self, size: int) -> bool:
        """Room for a MAIL declaring `size` (0: none) and nobody waiting before it;
        then `size` is pledged to it. False: it has to wait or be refused."""
        mem = self._memory
        if mem._waiters or not mem.fits(size):
            return False
        self._pledge(size)
        return True

    async def wait_admit(self, size: int) -> bool:
        """admit() once it is this MAIL's turn and its size fits, waiting up to the
        memory's `wait` seconds; False if that did not come."""
        mem = self._memory
        loop = asyncio.get_running_loop()
        end = time.monotonic() + mem.wait
        me = _Waiter(size, loop.create_future())
        mem._waiters.append(me)
        try:
            while True:
                first = mem._waiters[0] is me
                if first and mem.fits(size):  # (fits() drops the lapsed pledges)
                    self._pledge(size)
                    return True
                now = time.monotonic()
                if now >= end:
                    return False
                wake_at = end
                if first:  # a pledge that lapses frees room without anyone releasing it
                    lapse = mem._next_lapse()
                    if lapse is not None:
                        wake_at = min(end, lapse)
                if me.woken.done():
                    me.woken = loop.create_future()
                try:
                    async with asyncio.timeout(max(0.0, wake_at - now)):
                        await me.woken
                except TimeoutError:
                    pass
        finally:
            mem._waiters.remove(me)
            mem.wake(turn=True)  # the next in line: its turn, perhaps room left after this one

    def _pledge(self, size: int) -> None:
        if self.pledge:  # (a new MAIL always follows a release; never count one twice)
            self.unpledge()
        mem = self._memory
        if size and mem.wait:
            self.pledge = size
            mem.pledged += size
            mem._pledges[self] = time.monotonic() + mem.wait

    def unpledge(self) -> None:
        mem = self._memory
        mem.pledged -= self.pledge
        self.pledge = 0
        del mem._pledges[self]

    # -- during and after DATA ---------------------------------------------------
    def grow(self, size: int) -> bool:
        """Room for `size` bytes of this message (and CHUNK more, or its pledge,
        when there is room for it), or False: the budget cannot take them."""
        held = self.held
        if size <= held:
            return True
        mem = self._memory
        if size > mem.available + held + self.pledge and mem._pledges:
            mem.lapse(time.monotonic())  # others' lapsed pledges are not in its way
        pledge = self.pledge
        free = mem.available + held + pledge
        if size > free:
            return False
        if pledge:
            self.unpledge()
        want = min(max(size + CHUNK, pledge), free)
        mem.used += want - held
        self.held = want
        return True

    def fit(self, size: int) -> bool:
        """The message is read: hold exactly its size, or False if the budget
        cannot take it (then nothing is held)."""
        mem = self._memory
        held = self.held
        if size > mem.available + held + self.pledge:
            if mem._pledges:
                mem.lapse(time.monotonic())
            if size > mem.available + held + self.pledge:
                self.release()
                return False
        if self.pledge:
            self.unpledge()
        mem.used += size - held
        self.held = size
        if mem._waiters:  # what it held ahead (or was pledged) beyond its size is free
            mem.wake()
        return True

    def release(self) -> None:
        mem = self._memory
        mem.used -= self.held
        self.held = 0
        if self.pledge:
            self.unpledge()
        if mem._waiters:
            mem.wake()


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
