"""In-memory limit state for one process: GCRA arrival times and concurrency counts.
(The workers of one machine share theirs through store/shared.py, which makes the
same decisions on a table they all map.)

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
from collections.abc import Callable, Sequence

from gateway.store.base import CONC, RATE, Entry, GcraOp, gcra_new_tat


class MemoryStore:
    """Synchronous on purpose: the rate-limit check calls it inline, no task, no await."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._conc: dict[str, int] = {}

    def take(self, ops: Sequence[GcraOp]) -> int:
        """All or nothing: the index of the first limit that refuses (nothing is
        charged then), or -1 when every limit allowed and was charged."""
        now = self.clock()
        news = []
        for i, op in enumerate(ops):
            new_tat = gcra_new_tat(self._tat.get(op.key, now), now, op)
            if new_tat is None:
                return i
            news.append(new_tat)
        for op, new_tat in zip(ops, news, strict=True):
            self._tat[op.key] = new_tat
        if len(self._tat) > 100_000:
            self._prune(now)
        return -1

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

    # -- operators (`smtp-gateway ratelimit show|reset`) ---------------------------
    async def entries(self, prefix: str, exact: bool) -> list[Entry]:
        now = self.clock()
        out = []
        for kind, table in ((RATE, self._tat), (CONC, self._conc)):
            head = f"{kind}:{prefix}"
            for k, v in table.items():
                if k == head if exact else k.startswith(head):
                    if kind == RATE and v <= now:
                        continue  # drained: the same as absent
                    out.append(Entry(kind, k[len(kind) + 1 :], v - now if kind == RATE else v))
        return sorted(out)

    async def reset(self, prefix: str, exact: bool) -> int:
        n = 0
        for kind, table in ((RATE, self._tat), (CONC, self._conc)):
            head = f"{kind}:{prefix}"
            for k in [k for k in table if (k == head if exact else k.startswith(head))]:
                del table[k]
                n += 1
        return n

    async def close(self) -> None:
        pass
