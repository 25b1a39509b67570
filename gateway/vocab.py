"""The words every layer shares: the stages a transaction passes, what a policy may
decide (Action), a stage's decision (Verdict), and one authentication result.

SMTP, the pipeline and the checks all import this module, and it imports none of
them: the vocabulary sits below every layer that speaks it (a check must not
import the SMTP package to name an action, nor the pipeline to name a stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Stage(StrEnum):
    """Where in the session a check runs."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Action(StrEnum):
    """What the policy may decide; the order is the strength (reject strongest)."""

    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def strength(self) -> int:
        return _STRENGTH[self]


_STRENGTH = {a: i for i, a in enumerate(Action)}


@dataclass(frozen=True, slots=True)
class Verdict:
    """A stage's decision: the strongest action any symbol asked for, the symbol that
    asked first, and every symbol seen (for logs and tags)."""

    action: Action
    symbol: str = ""
    symbols: tuple[str, ...] = ()

    @property
    def refuses(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL)


ACCEPT = Verdict(Action.ACCEPT)


def action_of_code(code: int) -> Action:
    """What a reply code decided, as the policy's words: 2xx accept, 5xx reject, and
    anything else tempfail (a 3xx where a decision was due accepted nothing). The
    one place a code becomes an action, for the outcome counted and logged."""
    return Action.ACCEPT if code < 300 else Action.REJECT if code >= 500 else Action.TEMPFAIL


def combine(a: Verdict, b: Verdict) -> Verdict:
    """Keep the stronger action; keep every symbol seen (for logs and tags)."""
    symbols = a.symbols + b.symbols
    if b.action.strength > a.action.strength:
        return Verdict(b.action, b.symbol, symbols)
    return Verdict(a.action, a.symbol, symbols)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One RFC 8601 resinfo: method=result (reason) ptype.property=value ..."""

    method: str
    result: str
    props: dict[str, str] = field(default_factory=dict)
    reason: str = ""
