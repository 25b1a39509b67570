"""The check interface: find facts, emit symbols; never decide, never word a reply."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

from gateway.context import Context
from gateway.dns import Resolver
from gateway.vocab import Stage

Symbols = Sequence[str]


class Check(Protocol):
    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]
    # Every symbol this check can emit: the policy is validated against these.
    symbols: ClassVar[frozenset[str]]
    # Client-reputation and sender-authentication checks are exempt for
    # trusted networks (their results are still recorded); relay control is not.
    reputation: ClassVar[bool]
    # The checks whose facts (gateway/facts.py) this one reads: the runner runs
    # them before it, at the same stage or an earlier one.
    requires: ClassVar[frozenset[str]]
    # Seconds this check may take, when its options set their own; else the
    # policy's check_timeout. The runner enforces it and hands the check its
    # deadline (Context.deadline): a check keeps no clock of its own.
    budget: float | None

    def run(self, stage: Stage, ctx: Context) -> Symbols | Awaitable[Symbols]:
        """Return symbols (possibly empty), synchronously or as an awaitable."""
        ...


@runtime_checkable
class Configurable(Protocol):
    """A check with options (the policy's `checks.<name>`, validated by the type the
    check's module defines): the configured check is a new object, so a reload
    never changes the one a running transaction uses."""

    def configured(self, options: Any) -> Self: ...


def active_stages(check: Check) -> frozenset[Stage]:
    """The stages where `check`, as configured now, has anything to do.

    A check may define `active_stages()` (after `configure`): a rate limiter with
    no limits or a DNSBL with no zones then costs nothing per message, not even
    the runner's bookkeeping around a call that would return no symbols.
    """
    own = getattr(check, "active_stages", None)
    return check.stages if own is None else frozenset(own()) & check.stages


class OffLoopCheck:
    """Base for checks that run a synchronous library (dkimpy) off the event
    loop: a small bounded thread pool of their own, and our shared resolver."""

    def __init__(self, resolver: Resolver, *, threads: int, name: str) -> None:
        self.resolver = resolver
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def generic_symbols(check: str) -> set[str]:
    """Symbols the runner itself may emit for any check."""
    return {f"{check}.error", f"{check}.timeout"}
