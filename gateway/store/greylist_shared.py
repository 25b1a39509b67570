"""Greylist state shared by the workers of one machine: a memory-mapped table under
a POSIX record lock, as store/shared.py keeps the rate limits.

Why shared at all: with `workers: N` the kernel hands each connection to any
worker. A retry landing on another worker than the first attempt would find no
entry there and be deferred again, and a client could be deferred up to N times
before its triplet was known everywhere. Greylisting needs one memory per machine
(Redis gives one per cluster).

Why this table and not something else: it is the approach the rate limits already
take and have proven (store/shared.py: the record lock the kernel drops when its
holder dies, the master creating the file before it forks, Python's string hash
shared by forked workers). A decision holds the lock for a few microseconds; a
database file (SQLite) would also survive restarts, but its writes and lock waits
would stall the event loop for milliseconds, and the state it would keep across a
restart is what Redis is for.

Each slot: the key's 64-bit hash, its kind, its number, its expiry, and the first
KEY_BYTES of its text (for operators only; matching is by hash). A slot whose entry
has expired is free. When a new key's probe window is full, the entry expiring
soonest gives its slot up: pending entries (expire, 2 days) before whitelisted ones
(ttl, 36 days), so a flood of new triplets displaces its own kind first.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Callable, Sequence
from fcntl import LOCK_EX, LOCK_UN, lockf

from gateway.store.greylist import (
    PREFIX,
    Get,
    GreyEntry,
    Judgement,
    Params,
    Put,
    Record,
    allowed,
    decide,
    entry,
)
from gateway.store.mapped import carver, get_text, locked, open_table, put_text
from gateway.store.shared import PROBE, SCAN_CHUNK, _hash, _probe

_MAGIC = b"SGWGRY01"
_HEADER = struct.Struct("<8sI")  # magic, slots
_HEADER_SIZE = 64
KEY_BYTES = 96  # of a key's text kept for operators (a triplet is usually shorter)
SLOTS = 131_072  # about 16 MB of sparse file; pages are used as keys arrive


def table_path(limits_table: str) -> str:
    """The greylist table beside the rate-limit table the master made (cli.py)."""
    return os.path.join(os.path.dirname(limits_table), "greylist.table")


class SharedGreylist:
    """MemoryGreylist's decisions (store/greylist.py), made on a table all workers map."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.fd, self.mm = open_table(path)
        magic, slots = _HEADER.unpack_from(self.mm, 0)
        if magic != _MAGIC:
            raise ValueError(f"{path}: not a greylist table")
        self.slots: int = slots
        region = carver(self.mm, _HEADER_SIZE)
        self.hashes = region(slots, "Q", 8)
        self.since = region(slots, "d", 8)
        self.expires = region(slots, "d", 8)
        self.kinds = region(slots, "i", 4)
        self.keys = region(slots, "B", KEY_BYTES)

    @staticmethod
    def create(path: str, slots: int = SLOTS) -> None:
        """A fresh, empty table (sparse)."""
        size = _HEADER_SIZE + slots * (8 + 8 + 8 + 4 + KEY_BYTES)
        with open(path, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, slots))
            f.truncate(size)

    def _find(self, h: int, now: float) -> int:
        """The live slot of hash h, or -1."""
        slot, _ = _probe(self.hashes, self.slots, h, lambda s: False)
        return slot if slot >= 0 and self.expires[slot] > now else -1

    def _accessors(self, now: float) -> tuple[Get, Put]:
        hashes, since, expires, kinds, n = (
            self.hashes,
            self.since,
            self.expires,
            self.kinds,
            self.slots,
        )

        def get(key: str) -> Record | None:
            slot = self._find(_hash(key), now)
            return None if slot < 0 else Record(kinds[slot], since[slot], expires[slot])

        def put(key: str, rec: Record) -> None:
            h = _hash(key)
            slot, free = _probe(hashes, n, h, lambda s: hashes[s] == 0 or expires[s] <= now)
            if slot < 0:
                if free < 0:
                    free = min(((h + i) % n for i in range(PROBE)), key=lambda s: expires[s])
                slot = free
                hashes[slot] = h
                put_text(self.keys, slot, key, KEY_BYTES)
            kinds[slot] = rec.kind
            since[slot] = rec.since
            expires[slot] = rec.expires

        return get, put

    def judge(self, network: str, triplets: Sequence[str], p: Params) -> list[Judgement]:
        now = self.clock()
        lockf(self.fd, LOCK_EX)
        try:
            get, put = self._accessors(now)
            return decide(get, put, network, triplets, p, now)
        finally:
            lockf(self.fd, LOCK_UN)

    # -- operators ------------------------------------------------------------------
    async def _matches(self, prefix: str, exact: bool, now: float) -> list[tuple[int, int, str]]:
        """(slot, hash, key text) of the live entries an operator named; read without
        the lock, giving the event loop back every SCAN_CHUNK slots (store/shared.py
        says why)."""
        head = PREFIX + prefix
        if exact:
            h = _hash(head)
            slot = self._find(h, now)
            return [] if slot < 0 else [(slot, h, head)]
        out = []
        for start in range(0, self.slots, SCAN_CHUNK):
            if start:
                await asyncio.sleep(0)
            for slot in range(start, min(self.slots, start + SCAN_CHUNK)):
                h = self.hashes[slot]
                if h and self.expires[slot] > now:
                    key, cut = get_text(self.keys, slot, KEY_BYTES)
                    if key.startswith(head) or (cut and head.startswith(key)):
                        out.append((slot, h, key))
        return out

    async def entries(self, prefix: str, exact: bool) -> list[GreyEntry]:
        now = self.clock()
        out = []
        for slot, _, key in await self._matches(prefix, exact, now):
            rec = Record(self.kinds[slot], self.since[slot], self.expires[slot])
            out.append(entry(key, rec, now))
        return sorted(out)

    async def allow(self, key: str, p: Params) -> None:
        now = self.clock()
        full = PREFIX + key
        with locked(self.fd):
            get, put = self._accessors(now)
            put(full, allowed(full, get(full), p, now))

    async def reset(self, prefix: str, exact: bool) -> int:
        now = self.clock()
        found = await self._matches(prefix, exact, now)
        n = 0
        with locked(self.fd):  # each slot cleared only if it still holds the key found
            for slot, h, _ in found:
                if self.hashes[slot] == h:
                    self.hashes[slot] = 0
                    n += 1
        return n
