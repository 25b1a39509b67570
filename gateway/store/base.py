"""What a limit store is: the in-memory one (one process) or Redis (shared by replicas).

Keys are `rate:<limit name>:<key value>` and `conc:<limit name>:<key value>`;
operators name them without the kind, as `<limit name>:<key value>`.
"""

from __future__ import annotations

from typing import NamedTuple

RATE = "rate"
CONC = "conc"


class GcraOp(NamedTuple):
    """Charge `cost` units against `amount` per `period` seconds plus `burst`."""

    key: str
    period: float
    amount: int
    burst: int
    cost: int


# Clock arithmetic in floats: a request exactly on the allowed rate must not be
# refused because of rounding in repeated additions.
_EPSILON = 1e-6


def gcra_new_tat(tat: float, now: float, op: GcraOp) -> float | None:
    """GCRA (see store/memory.py): the key's theoretical arrival time after charging
    `op`, or None if the limit refuses it. `tat` is the stored one (`now` if none)."""
    t = op.period / op.amount
    new_tat = max(tat, now) + op.cost * t
    if new_tat - now > t * (op.amount + op.burst) + _EPSILON:
        return None
    return new_tat


class Entry(NamedTuple):
    """One key's state. rate: seconds of debt (how far the TAT is ahead of now);
    conc: slots held."""

    kind: str
    key: str
    value: float


class StoreError(Exception):
    """The shared store did not answer; the policy decides (ratelimit.unavailable)."""


def operator_key(key: str) -> tuple[str, bool]:
    """`NAME:VALUE` names one key (exact); `NAME` or `NAME:` every key of that limit."""
    name, sep, value = key.partition(":")
    if sep and value:
        return key, True
    return f"{name}:", False
