"""Counting one client's failures of a kind that only abuse produces in numbers.

Why: a wrong SRS hash is what a sender gets who guesses bounce addresses to
relay through us; a real bounce source produces one now and then (an address
past its age). So after a few within a window, that client's further attempts
are refused without being checked, which bounds what guessing can try far
below what the hash space needs (rewrite/srs.py has the arithmetic).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.net import network_of


class FailureLimit:
    """At most `limit` failures per client address, and `limit * NETWORK_FACTOR` per
    /24 (/64), in a window of `window` seconds that starts at the first failure.
    Per process; at most `max_clients` keys are kept (the oldest go first)."""

    NETWORK_FACTOR = 4

    def __init__(
        self,
        limit: int = 5,
        window: float = 3600.0,
        *,
        max_clients: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (window start, failures)

    def _count(self, key: str, now: float) -> int:
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window:
            return 0
        return entry[1]

    def blocked(self, ip: str) -> bool:
        now = self.clock()
        return (
            self._count(ip, now) >= self.limit
            or self._count(network_of(ip), now) >= self.limit * self.NETWORK_FACTOR
        )

    def failed(self, ip: str) -> None:
        now = self.clock()
        for key in (ip, network_of(ip)):
            entry = self._seen.pop(key, None)
            if entry is None or now - entry[0] >= self.window:
                entry = (now, 0)
            self._seen[key] = (entry[0], entry[1] + 1)  # re-inserted: the newest
        while len(self._seen) > self.max_clients:
            del self._seen[next(iter(self._seen))]
