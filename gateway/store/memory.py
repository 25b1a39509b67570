"""In-memory limit state for one process: GCRA arrival times and concurrency counts.

GCRA (the generic cell rate algorithm) keeps one number per key, the
theoretical arrival time (TAT). A limit of `count` per `period` with `burst`
extra has emission interval T = period / count and capacity count + burst:
a request costing n cells at time `now` is allowed iff
max(TAT, now) + n*T - now <= capacity * T, and then TAT moves forward.
It is the token bucket without a timer: exact and deterministic, a sender at
the allowed rate is never refused, and capacity comes back continuously.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Clock arithmetic in floats: a request exactly on the allowed rate must not be
# refused because of rounding in repeated additions.
_EPSILON = 1e-6


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._conc: dict[str, int] = {}

    def gcra(self, key: str, period: float, count: int, burst: int, cost: int = 1) -> bool:
        """Allowed or not; state is updated only when allowed."""
        now = self.clock()
        t = period / count
        limit = t * (count + burst)
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + cost * t
        if new_tat - now > limit + _EPSILON:
            return False
        self._tat[key] = new_tat
        if len(self._tat) > 100_000:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        for k in [k for k, v in self._tat.items() if v <= now]:
            del self._tat[k]

    def acquire(self, key: str, limit: int) -> bool:
        n = self._conc.get(key, 0)
        if n >= limit:
            return False
        self._conc[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._conc.get(key, 0) - 1
        if n > 0:
            self._conc[key] = n
        else:
            self._conc.pop(key, None)
