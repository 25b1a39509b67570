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

Pending entries are charged to the client network that made them (`owner`: the
network's key, whatever the triplet's origin), and a network holds at most
`max_pending` of them. A new triplet of a network at its cap displaces that
network's oldest pending entry if that one has waited `delay` (its sender had
the time to retry; an expired one too); if even the oldest is younger, the new
triplet is deferred without being recorded (`capped`: its retry is a first
attempt again). Why the client network and not the origin: one client can put
its triplets under any number of SPF origins (a wildcard SPF record passes
every subdomain of a domain it owns), but not under more networks than it has.
Why this rule:

- a flood of new triplets displaces only its own network's entries: every
  other network's pending entries, and every whitelisted entry, stay;
- a legitimate sender that makes more than `max_pending` new triplets at once
  (a list's first mailing to many recipients) is never made to go round in a
  circle: the first `max_pending` are kept until their retries can come, and
  pass, and the next ones are recorded as those leave;
- the network recovers `delay` after a flood stops, not `expire`: its pending
  entries may go once they have waited `delay`.

When the store itself is full (the in-memory store's capacity, a key's probe
window of the shared table), pending entries give way first, the heaviest
network's (most pending entries) first, so a network with a few pending
entries keeps them while others hold more; whitelisted entries go only when no
pending one is left to give way. A new triplet is always recorded then: a full
store never locks a sender out (docs/greylisting.md says what an attacker
holding as many networks as the store has entries can still do).

The in-memory and shared-table stores run this function; the Redis store runs the
same steps as a Lua script (store/greylist_redis.py), on Redis's clock.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol

TRIPLET = "grey:t:"
NETWORK = "grey:n:"
PREFIX = "grey:"

PENDING, WHITELISTED, NETWORK_PASSES = 1, 2, 3
STATES = {PENDING: "pending", WHITELISTED: "whitelisted", NETWORK_PASSES: "network"}

# Results of one triplet's judgement: new and early (and capped, below) defer it.
NEW, EARLY, PASSED, KNOWN, BY_NETWORK = "new", "early", "passed", "whitelisted", "network"
# A new triplet not recorded: its network holds max_pending pending entries, none
# of them older than delay (the module docstring).
CAPPED = "capped"
DEFERRED = frozenset({NEW, EARLY, CAPPED})

# Pending entries one client network may hold (GreylistOptions.max_pending_per_network).
MAX_PENDING = 1000


class Params(NamedTuple):
    """The policy's timings, in seconds; awl_after 0 turns auto-whitelisting off;
    max_pending: pending entries a client network may hold."""

    delay: float
    expire: float
    ttl: float
    awl_after: int
    awl_ttl: float
    max_pending: int = MAX_PENDING


class Record(NamedTuple):
    kind: int
    since: float  # see the module docstring: a time, or a network's passes
    expires: float
    owner: str = ""  # pending: the network key it is charged to


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
# room(network): whether the network may record one more pending entry, after
# displacing its oldest if it is at its cap and that one has waited `delay`.
Room = Callable[[str], bool]


def decide(
    get: Get, put: Put, room: Room, network: str, triplets: Sequence[str], p: Params, now: float
) -> list[Judgement]:
    """The judgement of each triplet (module docstring), reading and writing
    entries through get/put; get answers None for an absent or expired entry. A
    store's put keeps its count of each network's pending entries (Record.owner)."""
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
            if room(network):
                put(key, Record(PENDING, now, now + p.expire, network))
                out.append(Judgement(NEW, p.delay))
            else:
                out.append(Judgement(CAPPED, p.delay))
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


# Entries one process keeps in memory, at most (about 300 bytes each): past it, the
# expired go first, then pending ones, the heaviest network's oldest first, then the
# oldest-used of any kind (module docstring). A client creates pending entries at
# will (new senders and recipients), but no more than max_pending of its network's;
# whitelisted ones only by retrying each after `delay`.
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
        # Each network's pending keys, first attempt first (a pending entry's first
        # attempt never moves). Every pending entry is in its owner's, and only
        # pending ones: all changes go through _put and _delete.
        self._pending: dict[str, dict[str, None]] = {}

    def _getter(self, now: float) -> Get:
        table = self._entries

        def get(key: str) -> Record | None:
            rec = table.get(key)
            return None if rec is None or rec.expires <= now else rec

        return get

    def _put(self, key: str, rec: Record) -> None:
        old = self._entries.pop(key, None)
        if old is not None and old.kind == PENDING:
            self._uncharge(key, old.owner)
        self._entries[key] = rec
        if rec.kind == PENDING:
            self._pending.setdefault(rec.owner, {})[key] = None

    def _delete(self, key: str) -> Record:
        rec = self._entries.pop(key)
        if rec.kind == PENDING:
            self._uncharge(key, rec.owner)
        return rec

    def _uncharge(self, key: str, owner: str) -> None:
        keys = self._pending.get(owner)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._pending[owner]

    def _room(self, p: Params, now: float) -> Room:
        def room(owner: str) -> bool:
            keys = self._pending.get(owner)
            # Each turn displaces one entry or answers: at most as many turns as
            # the cap was lowered by (a reload), else one.
            while keys and len(keys) >= p.max_pending:
                oldest = next(iter(keys))
                rec = self._entries[oldest]
                if rec.expires > now and now - rec.since < p.delay:
                    return False
                self._delete(oldest)
            return True

        return room

    def judge(self, network: str, triplets: Sequence[str], p: Params) -> list[Judgement]:
        now = self.clock()
        out = decide(self._getter(now), self._put, self._room(p, now), network, triplets, p, now)
        if len(self._entries) > self.capacity:
            self._prune(now)
        return out

    def pending_of(self, network: str) -> int:
        """Pending entries charged to `network` (a network key), expired ones not yet
        dropped included: what its cap counts."""
        return len(self._pending.get(network, ()))

    def _prune(self, now: float) -> None:
        """Down to 90% of capacity: expired entries, then pending ones (the heaviest
        network's oldest first), then the oldest-used of any kind."""
        target = self.capacity * 9 // 10
        table = self._entries
        for k in [k for k, r in table.items() if r.expires <= now]:
            self._delete(k)
        if len(table) > target:
            self._shed_pending(len(table) - target)
        excess = len(table) - target
        if excess > 0:
            for k in list(itertools.islice(table, excess)):
                self._delete(k)

    def _shed_pending(self, excess: int) -> None:
        """Drop `excess` pending entries, each the oldest of the network holding the
        most (ties: the older entry first): a network with few keeps them while
        others hold more."""
        heap = [(-len(keys), self._oldest(keys), owner) for owner, keys in self._pending.items()]
        heapq.heapify(heap)
        while excess > 0 and heap:
            _, _, owner = heapq.heappop(heap)
            keys = self._pending[owner]
            self._delete(next(iter(keys)))
            excess -= 1
            if keys:
                heapq.heappush(heap, (-len(keys), self._oldest(keys), owner))

    def _oldest(self, keys: dict[str, None]) -> float:
        return self._entries[next(iter(keys))].since

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
            n += self._delete(k).expires > now
        return n
