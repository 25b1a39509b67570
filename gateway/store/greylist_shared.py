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
has expired is free.

A network's pending entries (store/greylist.py: charged to the client network that
made them, at most max_pending) are a list through their slots, oldest first
(`prev`, `next`), whose head, tail and length are the network's slot in a second
region keyed by the network's hash: the cap's count, the oldest to displace and
an entry leaving (a pass, a reset, its slot reused) are each O(1) under the lock.
The second region has twice as many slots as the first (each network in it has at
least one pending entry), so its probe windows are never full but by a freak of
hashing; a network that finds no slot there has its entries uncounted.

When a new key's probe window is full, a pending entry gives its slot up, the one
of the network holding the most (then the one expiring soonest); a whitelisted
one only when the window holds no pending one (then the one expiring soonest).

Links are slot + 1, so that a fresh (zeroed) table holds no links. A worker that
dies holding the lock may leave a list half changed; every step on a list is
bounded (no walk), and a list found inconsistent is forgotten (its network's
entries stay, uncounted), so the worst is a miscount, never a hang.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Callable, Sequence
from fcntl import LOCK_EX, LOCK_UN, lockf

from gateway.store.greylist import (
    PENDING,
    PREFIX,
    Get,
    GreyEntry,
    Judgement,
    Params,
    Put,
    Record,
    Room,
    allowed,
    decide,
    entry,
)
from gateway.store.mapped import carver, get_text, locked, open_table, put_text
from gateway.store.shared import PROBE, SCAN_CHUNK, _hash, _probe

_MAGIC = b"SGWGRY02"
_HEADER = struct.Struct("<8sII")  # magic, slots, network slots
_HEADER_SIZE = 64
KEY_BYTES = 96  # of a key's text kept for operators (a triplet is usually shorter)
SLOTS = 131_072  # about 23 MB of sparse file; pages are used as keys arrive
_SLOT_BYTES = 8 + 8 + 8 + 4 + 4 + 4 + 4 + KEY_BYTES
_NET_BYTES = 8 + 4 + 4 + 4


def table_path(limits_table: str) -> str:
    """The greylist table beside the rate-limit table the master made (cli.py)."""
    return os.path.join(os.path.dirname(limits_table), "greylist.table")


class SharedGreylist:
    """MemoryGreylist's decisions (store/greylist.py), made on a table all workers map."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.fd, self.mm = open_table(path)
        magic, slots, nets = _HEADER.unpack_from(self.mm, 0)
        if magic != _MAGIC:
            raise ValueError(f"{path}: not a greylist table")
        self.slots: int = slots
        self.nets: int = nets
        region = carver(self.mm, _HEADER_SIZE)
        self.hashes = region(slots, "Q", 8)
        self.since = region(slots, "d", 8)
        self.expires = region(slots, "d", 8)
        self.kinds = region(slots, "i", 4)
        self.owner = region(slots, "i", 4)  # its network's slot + 1 (pending), else 0
        self.prev = region(slots, "i", 4)  # the network's next older entry's slot + 1
        self.next = region(slots, "i", 4)  # ... and next newer one's
        self.keys = region(slots, "B", KEY_BYTES)
        self.n_hash = region(nets, "Q", 8)  # the network key's hash; 0: a free slot
        self.n_count = region(nets, "i", 4)  # its pending entries
        self.n_head = region(nets, "i", 4)  # its oldest one's slot + 1
        self.n_tail = region(nets, "i", 4)  # its newest one's slot + 1

    @staticmethod
    def create(path: str, slots: int = SLOTS) -> None:
        """A fresh, empty table (sparse)."""
        nets = 2 * slots
        size = _HEADER_SIZE + slots * _SLOT_BYTES + nets * _NET_BYTES
        with open(path, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, slots, nets))
            f.truncate(size)

    def _find(self, h: int, now: float) -> int:
        """The live slot of hash h, or -1."""
        slot, _ = _probe(self.hashes, self.slots, h, lambda s: False)
        return slot if slot >= 0 and self.expires[slot] > now else -1

    # -- each network's pending entries (under the lock) --------------------------
    def _net(self, owner: str, make: bool) -> int:
        """The network slot of `owner` (a network key), taken if `make`; -1 if none."""
        n_hash = self.n_hash
        h = _hash(owner)
        net, free = _probe(n_hash, self.nets, h, lambda s: n_hash[s] == 0)
        if net >= 0 or not make or free < 0:
            return net
        n_hash[free] = h
        self.n_count[free] = self.n_head[free] = self.n_tail[free] = 0
        return free

    def _forget_net(self, net: int) -> None:
        self.n_hash[net] = 0
        self.n_count[net] = self.n_head[net] = self.n_tail[net] = 0

    def _link(self, slot: int, net: int) -> None:
        """`slot` becomes its network's newest pending entry."""
        tail = self.n_tail[net]
        self.prev[slot], self.next[slot] = tail, 0
        if tail:
            self.next[tail - 1] = slot + 1
        else:
            self.n_head[net] = slot + 1
        self.n_tail[net] = slot + 1
        self.n_count[net] += 1
        self.owner[slot] = net + 1

    def _unlink(self, slot: int) -> None:
        """`slot` leaves its network's list, if it is in one."""
        net = self.owner[slot] - 1
        if net < 0:
            return
        before, after = self.prev[slot], self.next[slot]
        if before:
            self.next[before - 1] = after
        elif self.n_head[net] == slot + 1:
            self.n_head[net] = after
        if after:
            self.prev[after - 1] = before
        elif self.n_tail[net] == slot + 1:
            self.n_tail[net] = before
        self.owner[slot] = self.prev[slot] = self.next[slot] = 0
        self.n_count[net] -= 1
        if self.n_count[net] <= 0 or not self.n_head[net]:
            self._forget_net(net)

    def _room(self, p: Params, now: float) -> Room:
        def room(owner: str) -> bool:
            net = self._net(owner, make=False)
            if net < 0:
                return True
            # Each turn displaces one entry (the count falls) or answers.
            while self.n_hash[net] and self.n_count[net] >= p.max_pending:
                oldest = self.n_head[net] - 1
                if oldest < 0 or self.owner[oldest] != net + 1:
                    self._forget_net(net)  # half changed by a worker that died
                    return True
                if (
                    self.kinds[oldest] == PENDING
                    and self.expires[oldest] > now
                    and now - self.since[oldest] < p.delay
                ):
                    return False
                self._unlink(oldest)
                if self.kinds[oldest] == PENDING:
                    self.hashes[oldest] = 0
            return True

        return room

    def _victim(self, h: int) -> int:
        """The slot that gives way in the full window of hash h: a pending entry of
        the network holding the most, else the entry expiring soonest."""
        kinds, owner, n_count, expires = self.kinds, self.owner, self.n_count, self.expires

        def cost(s: int) -> tuple[int, int, float]:
            if kinds[s] != PENDING:
                return (1, 0, expires[s])
            net = owner[s] - 1
            return (0, -n_count[net] if net >= 0 else 0, expires[s])

        return min(((h + i) % self.slots for i in range(PROBE)), key=cost)

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
                slot = free if free >= 0 else self._victim(h)
                hashes[slot] = h
                put_text(self.keys, slot, key, KEY_BYTES)
            # Whatever the slot held leaves its network's list: an expired or
            # displaced entry of another key, or this key's pending one.
            self._unlink(slot)
            kinds[slot] = rec.kind
            since[slot] = rec.since
            expires[slot] = rec.expires
            if rec.kind == PENDING and rec.owner:
                net = self._net(rec.owner, make=True)
                if net >= 0:
                    self._link(slot, net)

        return get, put

    def judge(self, network: str, triplets: Sequence[str], p: Params) -> list[Judgement]:
        lockf(self.fd, LOCK_EX)
        try:
            # Read under the lock: the times written are in the order of the
            # decisions, so no worker finds an entry made after its own `now`.
            now = self.clock()
            get, put = self._accessors(now)
            return decide(get, put, self._room(p, now), network, triplets, p, now)
        finally:
            lockf(self.fd, LOCK_UN)

    def pending_of(self, network: str) -> int:
        """Pending entries charged to `network` (a network key), expired ones not yet
        displaced included: what its cap counts."""
        with locked(self.fd):
            net = self._net(network, make=False)
            return 0 if net < 0 else int(self.n_count[net])

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
        full = PREFIX + key
        with locked(self.fd):
            now = self.clock()
            get, put = self._accessors(now)
            put(full, allowed(full, get(full), p, now))

    async def reset(self, prefix: str, exact: bool) -> int:
        now = self.clock()
        found = await self._matches(prefix, exact, now)
        n = 0
        with locked(self.fd):  # each slot cleared only if it still holds the key found
            for slot, h, _ in found:
                if self.hashes[slot] == h:
                    self._unlink(slot)
                    self.hashes[slot] = 0
                    n += 1
        return n
