"""One GCRA take in a line, and the type of the `make` fixture (tests/unit/conftest.py):
each limit store built for a test, one process's (store/memory.py) or the workers'
shared table (store/shared.py), on a clock the test may move."""

from __future__ import annotations

from collections.abc import Callable

from gateway.store.base import GcraOp
from gateway.store.memory import MemoryStore


def gcra(s: MemoryStore, key: str, period: float, n: int, burst: int, cost: int = 1) -> bool:
    return s.take([GcraOp(key, period, n, burst, cost)]) == -1


Make = Callable[..., MemoryStore]
