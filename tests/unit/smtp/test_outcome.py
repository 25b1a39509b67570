"""How a transaction ended, counted and logged once (gateway/smtp/outcome.py)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import config, logs
from gateway.address import parse_path
from gateway.context import Context
from gateway.smtp.local import AcceptingBackend, LocalSession
from gateway.smtp.outcome import outcome_of, record
from gateway.smtp.transaction import Transaction
from gateway.vocab import Action
from tests.unit.smtp.sessions import POLICY, RATE_LIMITED, session_run


def test_a_refused_mail_is_logged_with_its_sender(
    settings: config.Settings, tmp_path: Path
) -> None:
    """The transaction line of a MAIL the policy defers names the sender: an
    operator looking for a sender's deferred mail finds it."""
    import io
    import json
    import logging

    from gateway import logs

    (tmp_path / "limited.yaml").write_text(
        POLICY
        + "  ratelimit:\n    limits:\n"
        + "      - {name: msgs, key: client_ip, unit: messages, rate: 1/hour}\n"
        + "    concurrency: []\n"
        + "actions:\n  ratelimit.exceeded: tempfail\n"
    )
    limited = settings.model_copy(update={"policy": str(tmp_path / "limited.yaml")})
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("INFO", "json", stream)

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[str]:
        await s.start()
        await s.send("EHLO client.test")
        first = await s.send("MAIL FROM:<first@sender.test>")
        await s.send("RCPT TO:<x@example.test>")
        await s.send("DATA")
        await s.message(b"Subject: s\r\n\r\nhi\r\n")
        second = await s.send("MAIL FROM:<second@sender.test>")
        return [first[0], second[0]]

    try:
        replies_seen = session_run(limited, play)
        logs.flush()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert replies_seen == ["250 2.1.0 Ok", RATE_LIMITED[0]]
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    txns = [x for x in lines if x.get("event") == "transaction"]
    assert [(t["mail_from"], t["outcome"], t["reason"]) for t in txns] == [
        ("first@sender.test", "delivered", "backend"),
        ("second@sender.test", "tempfailed", "ratelimit.exceeded"),
    ]


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """The events logged meanwhile, as JSON lines."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("INFO", "json", stream)
    try:
        yield stream
    finally:
        logs.flush()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def last_line(stream: io.StringIO) -> dict[str, Any]:
    logs.flush()
    return dict(json.loads(stream.getvalue().splitlines()[-1]))


@pytest.mark.parametrize(
    ("action", "outcome"),
    [
        (Action.ACCEPT, "delivered"),
        (Action.TAG, "delivered"),
        (Action.QUARANTINE, "delivered"),
        (Action.TEMPFAIL, "tempfailed"),
        (Action.REJECT, "rejected"),
    ],
)
def test_each_action_ends_as_one_outcome_of_a_closed_set(action: Action, outcome: str) -> None:
    assert outcome_of(action) == outcome


def test_an_aborted_transaction_is_aborted_whatever_the_action(logged: io.StringIO) -> None:
    ctx = Context("s1", "192.0.2.7", 1, "mx")
    assert record("s1", 1, ctx, Transaction(), Action.ACCEPT, "rset", aborted=True) == "aborted"
    line = last_line(logged)
    assert (line["event"], line["outcome"], line["reason"], line["txn"]) == (
        "transaction",
        "aborted",
        "rset",
        1,
    )


def test_a_transaction_that_never_started_took_no_time(logged: io.StringIO) -> None:
    """A MAIL refused before its transaction began logs 0 ms, not the process's
    monotonic clock."""
    ctx = Context("s1", "192.0.2.7", 1, "mx")
    record("s1", 1, ctx, Transaction(), Action.TEMPFAIL, "ratelimit.exceeded")
    assert last_line(logged)["duration_ms"] == 0.0


def test_the_line_names_what_rewriting_and_the_backend_changed(logged: io.StringIO) -> None:
    ctx = Context("s1", "192.0.2.7", 1, "mx", helo="client.test")
    ctx.mail_from = parse_path("<joe@orig.test>")
    alias, member = parse_path("<team@example.test>"), parse_path("<a@example.test>")
    ctx.recipients = [member]
    ctx.rewritten = [(alias, (member,))]
    t = Transaction(backend_sender=parse_path("<SRS0=x=y=orig.test=joe@srs.test>"))
    t.rcpt_refused = ["<b@example.test> 550 5.1.1 unknown"]
    assert record("s1", 2, ctx, t, Action.ACCEPT, "backend", size=42) == "delivered"
    line = last_line(logged)
    assert line["mail_from"] == "joe@orig.test" and line["helo"] == "client.test"
    assert line["backend_sender"] == "SRS0=x=y=orig.test=joe@srs.test"
    assert line["rewritten"] == {"team@example.test": ["a@example.test"]}
    assert line["refused"] == ["<b@example.test> 550 5.1.1 unknown"]
    assert (line["rcpts"], line["size"], line["outcome"]) == (1, 42, "delivered")


def test_an_unchanged_sender_is_not_named_twice(logged: io.StringIO) -> None:
    ctx = Context("s1", "192.0.2.7", 1, "mx")
    ctx.mail_from = parse_path("<joe@orig.test>")
    record("s1", 1, ctx, Transaction(backend_sender=ctx.mail_from), Action.REJECT, "spf.fail")
    line = last_line(logged)
    assert "backend_sender" not in line and "rewritten" not in line and "refused" not in line
    assert line["outcome"] == "rejected"
