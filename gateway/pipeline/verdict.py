"""A stage's decision: the strongest action any symbol asked for, and why."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.smtp.replies import Action


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    symbol: str = ""
    symbols: tuple[str, ...] = ()

    @property
    def refuses(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL)


ACCEPT = Verdict(Action.ACCEPT)


def combine(a: Verdict, b: Verdict) -> Verdict:
    """Keep the stronger action; keep every symbol seen (for logs and tags)."""
    symbols = a.symbols + b.symbols
    if b.action.strength > a.action.strength:
        return Verdict(b.action, b.symbol, symbols)
    return Verdict(a.action, a.symbol, symbols)
