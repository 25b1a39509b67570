"""Greylisting state: what each store keeps, the one decision they all make, and
the in-memory store (one process).

Keys: a triplet is `grey:t:<origin>|<sender>|<recipient>` (checks/greylist_keys.py
builds it), a client network's auto-whitelist entry `grey:n:<network>`. Operators
name them without `grey:` (`t:...`, `n:...`).

One entry per key, a Record: its kind, a number, and when it expires. An entry
past its expiry is the same as none, so nothing needs a sweeper to be correct:

    pending      since = the first attempt; expires = first attempt + expire
    whitelisted  since = the retry that passed; expires = last use + ttl
    network      since = how many triplets of the network passed; expires =
                 last pass or use + auto-whitelist ttl

The decision (`decide`), for one client network and the triplets of one
recipient (RCPT) or one message (DATA):

- a network with at least `awl_after` passes is auto-whitelisted: every triplet
  passes and nothing else is looked at (its expiry is renewed);
- an unknown (or expired) triplet becomes pending: deferred (`new`);
- a pending one retried before `delay` has passed since its first attempt:
  deferred again (`early`); its first attempt stays where it was, so a client
  retrying every minute passes after `delay` as one that waited;
- a pending one retried after `delay` (and before `expire`, or it would be gone):
  whitelisted (`passed`), and counted as a pass of its network;
- a whitelisted one: passes (`whitelisted`), its ttl renewed, counted as a pass.

The in-memory and shared-table stores run this function; the Redis store runs the
same steps as a Lua script (store/greylist_redis.py), on Redis's clock.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol

TRIPLET = "grey:t:"
NETWORK = "grey:n:"
PREFIX = "grey:"

PENDING, WHITELISTED, NETWORK_PASSES = 1, 2, 3
STATES = {PENDING: "pending", WHITELISTED: "whitelisted", NETWORK_PASSES: "network"}

# Results of one triplet's judgement: the first two defer it.
NEW, EARLY, PASSED, KNOWN, BY_NETWORK = "new", "early", "passed", "whitelisted", "network"
DEFERRED = frozenset({NEW, EARLY})


class Params(NamedTuple):
    """The policy's timings, in seconds; awl_after 0 turns auto-whitelisting off."""

    delay: float
    expire: float
    ttl: float
    awl_after: int
    awl_ttl: float


class Record(NamedTuple):
    kind: int
    since: float  # see the module docstring: a time, or a network's passes
    expires: float


class Judgement(NamedTuple):
    result: str  # new, early, passed, whitelisted, network
    wait: float  # seconds until a retry can pass (deferred results), else 0


class GreyEntry(NamedTuple):
    """One entry as operators see it (`smtp-gateway greylist show`)."""

    key: str  # without "grey:": t:<origin>|<sender>|<recipient> or n:<network>
    state: str  # pending, whitelisted, network
    age: float  # seconds since the first attempt (pending) or the pass (whitelisted)
    left: float  # seconds until it expires
    passes: int = 0  # network: triplets of it that passed


class GreylistStore(Protocol):
    """What the check and the operators' commands need of a store."""

    def judge(
        self, network: str, triplets: Sequence[str], p: Params
    ) -> list[Judgement] | Awaitable[list[Judgement]]: ...

    async def entries(self, prefix: str, exact: bool) -> list[GreyEntry]: ...

    async def allow(self, key: str, p: Params) -> None: ...

    async def reset(self, prefix: str, exact: bool) -> int: ...


Get = Callable[[str], Record | None]
Put = Callable[[str, Record], None]


def decide(
    get: Get, put: Put, network: str, triplets: Sequence[str], p: Params, now: float
) -> list[Judgement]:
    """The judgement of each triplet (module docstring), reading and writing
    entries through get/put; get answers None for an absent or expired entry."""
    if p.awl_after > 0:
        net = get(network)
        if net is not None and net.kind == NETWORK_PASSES and net.since >= p.awl_after:
            put(network, Record(NETWORK_PASSES, net.since, now + p.awl_ttl))
            return [Judgement(BY_NETWORK, 0.0)] * len(triplets)
    out = []
    passes = 0
    for key in triplets:
        rec = get(key)
        if rec is None or rec.kind not in (PENDING, WHITELISTED):
            put(key, Record(PENDING, now, now + p.expire))
            out.append(Judgement(NEW, p.delay))
        elif rec.kind == WHITELISTED:
            put(key, Record(WHITELISTED, rec.since, now + p.ttl))
            out.append(Judgement(KNOWN, 0.0))
            passes += 1
        elif now - rec.since < p.delay:
            out.append(Judgement(EARLY, p.delay - (now - rec.since)))
        else:
            put(key, Record(WHITELISTED, now, now + p.ttl))
            out.append(Judgement(PASSED, 0.0))
            passes += 1
    if p.awl_after > 0 and passes:
        net = get(network)
        count = net.since if net is not None and net.kind == NETWORK_PASSES else 0
        put(network, Record(NETWORK_PASSES, count + passes, now + p.awl_ttl))
    return out


def allowed(key: str, current: Record | None, p: Params, now: float) -> Record:
    """What `smtp-gateway greylist allow` writes: a triplet whitelisted for ttl, a
    network auto-whitelisted (its passes at least awl_after) for the awl ttl."""
    if key.startswith(NETWORK):
        passes = current.since if current is not None and current.kind == NETWORK_PASSES else 0
        return Record(NETWORK_PASSES, max(passes, p.awl_after, 1), now + p.awl_ttl)
    return Record(WHITELISTED, now, now + p.ttl)


def entry(key: str, rec: Record, now: float) -> GreyEntry:
    """`rec` of store key `key` as operators see it."""
    state = STATES.get(rec.kind, "unknown")
    name = key.removeprefix(PREFIX)
    if rec.kind == NETWORK_PASSES:
        return GreyEntry(name, state, 0.0, rec.expires - now, int(rec.since))
    return GreyEntry(name, state, now - rec.since, rec.expires - now)


def matches(key: str, head: str, exact: bool) -> bool:
    return key == head if exact else key.startswith(head)


# Entries one process keeps in memory, at most (about 250 bytes each): past it, the
# expired go first, then the oldest-used, pending before whitelisted. A client can
# create pending entries at will (new senders and recipients), whitelisted ones only
# by retrying each after `delay`, so a flood of new triplets pushes out its own kind.
MAX_ENTRIES = 131_072


class MemoryGreylist:
    """One process's greylist (workers share theirs: store/greylist_shared.py).
    Synchronous: the check calls it inline, no task, no await."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, capacity: int = MAX_ENTRIES
    ) -> None:
        self.clock = clock
        self.capacity = capacity
        # Insertion order is use order: a written key is moved to the end.
        self._entries: dict[str, Record] = {}

    def _getter(self, now: float) -> Get:
        table = self._entries

        def get(key: str) -> Record | None:
            rec = table.get(key)
            return None if rec is None or rec.expires <= now else rec

        return get

    def _put(self, key: str, rec: Record) -> None:
        self._entries.pop(key, None)
        self._entries[key] = rec

    def judge(self, network: str, triplets: Sequence[str], p: Params) -> list[Judgement]:
        now = self.clock()
        out = decide(self._getter(now), self._put, network, triplets, p, now)
        if len(self._entries) > self.capacity:
            self._prune(now)
        return out

    def _prune(self, now: float) -> None:
        """Down to 90% of capacity: expired entries, then the oldest-used pending
        ones, then the oldest-used of any kind."""
        target = self.capacity * 9 // 10
        table = self._entries
        for k in [k for k, r in table.items() if r.expires <= now]:
            del table[k]
        for kinds in ((PENDING,), (PENDING, WHITELISTED, NETWORK_PASSES)):
            excess = len(table) - target
            if excess <= 0:
                return
            old = []
            for k, r in table.items():
                if r.kind in kinds:
                    old.append(k)
                    if len(old) >= excess:
                        break
            for k in old:
                del table[k]

    # -- operators (`smtp-gateway greylist show|allow|reset`) ---------------------
    async def entries(self, prefix: str, exact: bool) -> list[GreyEntry]:
        now = self.clock()
        head = PREFIX + prefix
        return sorted(
            entry(k, r, now)
            for k, r in self._entries.items()
            if r.expires > now and matches(k, head, exact)
        )

    async def allow(self, key: str, p: Params) -> None:
        now = self.clock()
        full = PREFIX + key
        self._put(full, allowed(full, self._getter(now)(full), p, now))

    async def reset(self, prefix: str, exact: bool) -> int:
        now = self.clock()
        head = PREFIX + prefix
        gone = [k for k in self._entries if matches(k, head, exact)]
        n = 0
        for k in gone:
            n += self._entries.pop(k).expires > now
        return n
