"""One transaction's state (gateway/smtp/transaction.py): new at MAIL and at the
transaction's end, so nothing of one leaks into the next."""

from __future__ import annotations

import dataclasses

import pytest

from gateway import config
from gateway.smtp.local import AcceptingBackend, LocalSession
from gateway.smtp.transaction import Transaction
from tests.unit.smtp.sessions import session_run


def test_a_new_transaction_holds_nothing_and_shares_nothing() -> None:
    one, two = Transaction(), Transaction()
    assert one == two
    assert (one.view, one.backend, one.broken, one.backend_sender, one.rcpt_tried) == (
        None,
        None,
        None,
        None,
        0,
    )
    one.mail_params.append("SMTPUTF8")
    one.rcpt_refused.append("<x@y> 550")
    assert two.mail_params == [] and two.rcpt_refused == []


def test_a_field_not_declared_cannot_be_set() -> None:
    """Slots: a typo in a field name is an error, not state that outlives its use."""
    with pytest.raises(AttributeError):
        Transaction().rcpt_triedd = 1  # type: ignore[attr-defined]
    assert {f.name for f in dataclasses.fields(Transaction)} >= {"view", "backend", "broken"}


def test_each_transaction_of_a_session_starts_from_nothing(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[tuple[int, int, bool]]:
        seen = []
        await s.start()
        await s.send("EHLO client.test")
        for rcpts in (["x@example.test", "x@remote.test"], ["y@example.test"]):
            await s.send("MAIL FROM:<a@sender.test>")
            t = s.session.t
            for r in rcpts:
                await s.send(f"RCPT TO:<{r}>")
            seen.append((t.rcpt_tried, len(s.session.ctx.recipients), t.view is not None))
            await s.send("DATA")
            await s.message(b"Subject: s\r\n\r\nhi\r\n")
            assert s.session.t is not t and s.session.t.view is None  # ended: a new one
        return seen

    # The refused relay recipient counted in the first; nothing of it in the second.
    assert session_run(settings, play) == [(2, 1, True), (1, 1, True)]
