"""The shared vocabulary (gateway/vocab.py): the strength of actions, how two
verdicts combine, and the one place a reply code becomes an action."""

from __future__ import annotations

import pytest

from gateway.vocab import ACCEPT, Action, Verdict, action_of_code, combine


def test_actions_are_ordered_by_strength_reject_strongest() -> None:
    order = [Action.ACCEPT, Action.TAG, Action.QUARANTINE, Action.TEMPFAIL, Action.REJECT]
    assert sorted(Action, key=lambda a: a.strength) == order
    assert len({a.strength for a in Action}) == len(Action)


@pytest.mark.parametrize("action", list(Action))
def test_only_reject_and_tempfail_refuse(action: Action) -> None:
    assert Verdict(action).refuses is (action in (Action.REJECT, Action.TEMPFAIL))


def test_combine_keeps_the_stronger_action_and_every_symbol() -> None:
    tag = Verdict(Action.TAG, "a.meh", ("a.meh",))
    reject = Verdict(Action.REJECT, "b.bad", ("b.bad",))
    assert combine(tag, reject) == Verdict(Action.REJECT, "b.bad", ("a.meh", "b.bad"))
    assert combine(reject, tag) == Verdict(Action.REJECT, "b.bad", ("b.bad", "a.meh"))
    # Of two equally strong, the first to ask decides (its symbol is the reason).
    other = Verdict(Action.TAG, "c.meh", ("c.meh",))
    assert combine(tag, other).symbol == "a.meh"
    assert combine(ACCEPT, tag) == tag


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (200, Action.ACCEPT),
        (250, Action.ACCEPT),
        (299, Action.ACCEPT),
        (300, Action.TEMPFAIL),  # a 3xx where a decision was due accepted nothing
        (354, Action.TEMPFAIL),
        (421, Action.TEMPFAIL),
        (451, Action.TEMPFAIL),
        (499, Action.TEMPFAIL),
        (500, Action.REJECT),
        (554, Action.REJECT),
    ],
)
def test_a_reply_code_is_the_action_it_decided(code: int, action: Action) -> None:
    assert action_of_code(code) is action
