"""Limit state shared by the workers of one machine: GCRA arrival times and
concurrency counts in a memory-mapped table, under a POSIX record lock.

Why: with `workers: N` and the in-memory store, each process counted for itself,
so a client got N times its limit. Redis shares counts between machines; this
shares them between the processes of one, with nothing to run. The master creates
the table file before it forks; every worker maps it.

Why a record lock (`lockf`): the kernel drops it when its holder dies, so a worker
killed inside the few microseconds it holds the lock cannot wedge the others, as a
semaphore would. A concurrency slot is counted per worker, and a worker that
(re)starts clears its own counts: a crashed worker's connections are gone, and so
are the slots they held.

Keys are found by a 64-bit hash in a bounded probe window; a rate key whose
arrival time has passed is the same as an absent one, so its slot is free again.
The key text (its first bytes) is kept only for `smtp-gateway ratelimit show`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Sequence
from fcntl import LOCK_EX, LOCK_UN, lockf
from typing import Any

from gateway.store.base import CONC, RATE, Entry, GcraOp, gcra_new_tat
from gateway.store.mapped import carver, get_text, locked, open_table, put_text
from gateway.store.memory import MemoryStore

_MAGIC = b"SGWLIM01"
_HEADER = struct.Struct("<8sIII")  # magic, rate slots, concurrency slots, workers
_HEADER_SIZE = 64
KEY_BYTES = 64  # of a key's text kept for operators; matching is by hash
PROBE = 32
SCAN_CHUNK = 8192  # slots an operator's scan reads between two returns to the event loop


def _hash(key: str) -> int:
    """Python's own string hash: every worker is forked from the master, so all
    share its hash secret (and a string caches its hash). 0 marks an empty slot."""
    return (hash(key) & 0xFFFF_FFFF_FFFF_FFFF) or 1


def _probe(hashes: Any, n: int, h: int, free: Callable[[int], bool]) -> tuple[int, int]:
    """In the window of hash h: the slot holding h (or -1), and the first free one
    before it (or -1)."""
    first_free = -1
    for i in range(PROBE):
        slot = (h + i) % n
        if hashes[slot] == h:
            return slot, first_free
        if first_free < 0 and free(slot):
            first_free = slot
    return -1, first_free


class SharedStore(MemoryStore):
    """The in-memory store's decisions, made on a table all workers share."""

    def __init__(
        self,
        path: str,
        worker: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self.path = path  # the greylist table is found beside it (store/greylist_shared.py)
        self.fd, self.mm = open_table(path)
        magic, rate_slots, conc_slots, workers = _HEADER.unpack_from(self.mm, 0)
        if magic != _MAGIC or not 0 <= worker < workers:
            raise ValueError(f"{path}: not a limit table for worker {worker}")
        self.worker: int = worker
        self.workers: int = workers
        region = carver(self.mm, _HEADER_SIZE)
        self.rate_slots: int = rate_slots
        self.conc_slots: int = conc_slots
        self.r_hash = region(rate_slots, "Q", 8)
        self.r_tat = region(rate_slots, "d", 8)
        self.r_key = region(rate_slots, "B", KEY_BYTES)
        self.c_hash = region(conc_slots, "Q", 8)
        self.c_count = region(conc_slots * workers, "i", 4)
        self.c_key = region(conc_slots, "B", KEY_BYTES)
        with locked(self.fd):  # a (re)started worker holds no connections yet
            counts = self.c_count
            for slot in range(conc_slots):
                counts[slot * workers + worker] = 0

    @staticmethod
    def create(path: str, workers: int, rate_slots: int = 65536, conc_slots: int = 16384) -> None:
        """A fresh, empty table (sparse: pages are used as keys arrive)."""
        size = _HEADER_SIZE + rate_slots * (16 + KEY_BYTES) + conc_slots * (8 + 4 * workers)
        size += conc_slots * KEY_BYTES
        with open(path, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, rate_slots, conc_slots, workers))
            f.truncate(size)

    # -- rates --------------------------------------------------------------------
    def _rate_slot(self, key: str, now: float) -> int:
        """The slot of `key`, claimed for it if it has none: a free or drained slot in
        its window, else the one closest to drained (a full window means a table too
        small: the limit that loses its debt is the one nearest to having none). A
        claimed slot starts with its arrival time at `now`, the same as no entry."""
        h, n = _hash(key), self.rate_slots
        hashes, tats = self.r_hash, self.r_tat
        slot, free = _probe(hashes, n, h, lambda s: hashes[s] == 0 or tats[s] <= now)
        if slot >= 0:
            return slot
        if free < 0:
            free = min(((h + i) % n for i in range(PROBE)), key=lambda s: tats[s])
        hashes[free] = h
        tats[free] = now
        put_text(self.r_key, free, key, KEY_BYTES)
        return free

    def take(self, ops: Sequence[GcraOp]) -> int:
        now = self.clock()
        lockf(self.fd, LOCK_EX)  # not `with locked(self.fd)`: a third of the cost, per message
        try:
            slots, news = [], []
            for i, op in enumerate(ops):
                slot = self._rate_slot(op.key, now)
                new_tat = gcra_new_tat(self.r_tat[slot], now, op)
                if new_tat is None:
                    return i
                slots.append(slot)
                news.append(new_tat)
            for slot, new_tat in zip(slots, news, strict=True):
                self.r_tat[slot] = new_tat
        finally:
            lockf(self.fd, LOCK_UN)
        return -1

    # -- concurrency --------------------------------------------------------------
    def _conc_slot(self, h: int, claim: bool) -> int:
        """The slot of hash h; else, if `claim`, one with no connection counted."""
        w, counts = self.workers, self.c_count
        slot, free = _probe(
            self.c_hash, self.conc_slots, h, lambda s: not any(counts[s * w : (s + 1) * w])
        )
        return slot if slot >= 0 else (free if claim else -1)

    def acquire(self, key: str, limit: int) -> bool:
        h, w = _hash(key), self.workers
        lockf(self.fd, LOCK_EX)
        try:
            slot = self._conc_slot(h, claim=True)
            if slot < 0:
                return True  # every slot near it is busy: not counted, never refused
            row = slot * w
            if sum(self.c_count[row : row + w]) >= limit:
                return False
            if self.c_hash[slot] != h:
                self.c_hash[slot] = h
                put_text(self.c_key, slot, key, KEY_BYTES)
            self.c_count[row + self.worker] += 1
        finally:
            lockf(self.fd, LOCK_UN)
        return True

    def release(self, key: str) -> None:
        lockf(self.fd, LOCK_EX)
        try:
            slot = self._conc_slot(_hash(key), claim=False)
            if slot >= 0:
                i = slot * self.workers + self.worker
                self.c_count[i] = max(0, self.c_count[i] - 1)
        finally:
            lockf(self.fd, LOCK_UN)

    # -- operators ------------------------------------------------------------------
    async def _matches(self, kind: str, prefix: str, exact: bool) -> list[tuple[int, int, str]]:
        """(slot, hash, key text) of what an operator named. Read without the lock:
        a scan of the table would hold up every worker's decisions for milliseconds,
        and an operator's view a decision old is as good. For the same reason the scan
        gives the event loop back every SCAN_CHUNK slots: the whole table (80,000
        slots) took about 12 ms, a stall for every session of the worker asked."""
        hashes, keys, n = (
            (self.r_hash, self.r_key, self.rate_slots)
            if kind == RATE
            else (self.c_hash, self.c_key, self.conc_slots)
        )
        head = f"{kind}:{prefix}"
        if exact:
            h = _hash(head)
            slot, _ = _probe(hashes, n, h, lambda s: False)
            return [] if slot < 0 else [(slot, h, get_text(keys, slot, KEY_BYTES)[0])]
        out = []
        for start in range(0, n, SCAN_CHUNK):
            if start:
                await asyncio.sleep(0)
            for slot in range(start, min(n, start + SCAN_CHUNK)):
                h = hashes[slot]
                if h:
                    key, cut = get_text(keys, slot, KEY_BYTES)
                    if key.startswith(head) or (cut and head.startswith(key)):
                        out.append((slot, h, key))
        return out

    async def entries(self, prefix: str, exact: bool) -> list[Entry]:
        now, w = self.clock(), self.workers
        out = []
        for slot, _, key in await self._matches(RATE, prefix, exact):
            if self.r_tat[slot] > now:
                out.append(Entry(RATE, key[len(RATE) + 1 :], self.r_tat[slot] - now))
        for slot, _, key in await self._matches(CONC, prefix, exact):
            held = sum(self.c_count[slot * w : (slot + 1) * w])
            if held:
                out.append(Entry(CONC, key[len(CONC) + 1 :], held))
        return sorted(out)

    async def reset(self, prefix: str, exact: bool) -> int:
        now, n, w = self.clock(), 0, self.workers
        rates = await self._matches(RATE, prefix, exact)
        conns = await self._matches(CONC, prefix, exact)
        with locked(self.fd):  # each slot cleared only if it still holds the key found
            for slot, h, _ in rates:
                if self.r_hash[slot] == h:
                    n += self.r_tat[slot] > now
                    self.r_hash[slot] = 0
            for slot, h, _ in conns:
                if self.c_hash[slot] == h:
                    n += any(self.c_count[slot * w : (slot + 1) * w])
                    self.c_count[slot * w : (slot + 1) * w] = memoryview(bytes(4 * w)).cast("i")
        return n
