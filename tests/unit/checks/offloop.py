"""Running a check built on OffLoopCheck (gateway/checks/base.py: DKIM, ARC) on one
message, for their tests: such a check answers at once on the loop when the work
is small and from its thread pool otherwise, and the tests assert which it did."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol

from gateway.context import Context
from gateway.vocab import Stage


class _OffLoop(Protocol):
    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]: ...

    def close(self) -> None: ...


def run_at_data(check: _OffLoop, message: bytes) -> tuple[tuple[str, ...], Context, bool]:
    """The symbols `check` gives `message` at DATA, the context it wrote its facts
    into, and whether it answered at once (no await: decided on the loop). The check
    is closed after (its thread pool with it)."""
    ctx = Context("s", "192.0.2.1", 1, "mx")
    ctx.wire = message

    async def go() -> tuple[tuple[str, ...], bool]:
        r = check.run(Stage.DATA, ctx)
        return (r, True) if isinstance(r, tuple) else (await r, False)

    try:
        symbols, at_once = asyncio.run(go())
    finally:
        check.close()
    return symbols, ctx, at_once
