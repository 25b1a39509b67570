"""When reports are made, and by whom.

Runs fall at `send_delay` seconds past each UTC-aligned interval boundary (00:10
UTC daily, by default): late enough for every worker's and replica's last flush of
the interval that ended. A scheduler also runs once at its start, so that intervals
that ended while the gateway was stopped are reported then.

Exactly one process sends. With `workers: N` only worker 0 runs a scheduler (the
master only forks and supervises); `smtp-gateway dmarc-report` may run beside it,
and replicas sharing a Redis store each run one: a run holds the store's lease,
and an interval's rows are deleted as its reports are made, so whoever runs next
finds nothing left to send twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger("gateway.dmarcreports")


def next_run(now: float, interval: int, delay: float) -> float:
    """The first run time after `now`: a boundary (a multiple of `interval` since
    the epoch, i.e. aligned to UTC midnight) plus `delay`."""
    k = math.floor((now - delay) / interval) + 1
    return k * interval + delay


def is_sender(worker: int) -> bool:
    """Whether this process (worker index; 0 for a single process) runs reports."""
    return worker == 0


class Runs(Protocol):
    async def run(self, now: float) -> object: ...


class Scheduler:
    def __init__(
        self,
        reporter: Runs,
        interval: int,
        delay: float,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.reporter = reporter
        self.interval = interval
        self.delay = delay
        self.clock = clock
        self.sleep = sleep

    async def run(self) -> None:
        """Until cancelled: once now, then at every run time."""
        await self.once()
        while True:
            now = self.clock()
            await self.sleep(max(0.0, next_run(now, self.interval, self.delay) - now))
            await self.once()

    async def once(self) -> None:
        """One run; its failure is logged, and the next run is still due."""
        try:
            await self.reporter.run(self.clock())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("DMARC report run failed")
