"""Fixtures of the unit tier shared across its folders."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.store.memory import MemoryStore
from gateway.store.shared import SharedStore
from tests.unit.store.stores import Make


@pytest.fixture(params=["memory", "shared"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    """Each store's decisions must be the same: one process's dictionaries, or the
    table the workers of one machine share (here as its only worker)."""

    def build(clock: Callable[[], float] = time.monotonic) -> MemoryStore:
        if request.param == "memory":
            return MemoryStore(clock)
        path = str(tmp_path / "limits.table")
        SharedStore.create(path, workers=1, rate_slots=1024, conc_slots=256)
        return SharedStore(path, 0, clock)

    return build
