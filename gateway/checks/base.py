"""The check interface: find facts, emit symbols; never decide, never word a reply."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import ClassVar, Protocol

from gateway.pipeline.stage import Context, Stage

Symbols = Sequence[str]


class Check(Protocol):
    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]
    # Every symbol this check can emit: the policy is validated against these.
    symbols: ClassVar[frozenset[str]]
    # Client-reputation and sender-authentication checks are exempt for
    # trusted networks (their results are still recorded); relay control is not.
    reputation: ClassVar[bool]

    def run(self, stage: Stage, ctx: Context) -> Symbols | Awaitable[Symbols]:
        """Return symbols (possibly empty), synchronously or as an awaitable."""
        ...
