"""The context checks see (gateway/context.py): what a new transaction resets, and
exactly that; the message unstuffed once, on demand."""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.address import parse_path
from gateway.context import Context
from gateway.facts import Facts, SpfFacts
from gateway.vocab import AuthResult

# What a connection knows, for all its transactions. `deadline` is the runner's,
# set before each check.
SESSION = {
    "session_id", "client_ip", "client_port", "listener", "trusted", "helo",
    "tls_version", "tls_cipher", "dnsbl_score", "dnsbl_hits", "allowlisted",
    "details", "on_close", "deadline",
}  # fmt: skip
TRANSACTION = {
    "mail_from", "rcpt", "recipients", "rewritten", "wire", "_message", "auth",
    "facts", "tags", "quarantine",
}  # fmt: skip


def busy() -> Context:
    """A context with every field away from its default."""
    a = parse_path("<a@sender.test>")
    ctx = Context("s1", "192.0.2.1", 4000, "mx")
    values: dict[str, Any] = {
        "trusted": True,
        "helo": "client.test",
        "tls_version": "TLSv1.3",
        "tls_cipher": "TLS_AES_128_GCM_SHA256",
        "dnsbl_score": 2.5,
        "dnsbl_hits": ["zone.test"],
        "allowlisted": True,
        "details": {"dnsbl.listed": "zone.test"},
        "on_close": [lambda: None],
        "deadline": 12.5,
        "mail_from": a,
        "rcpt": a,
        "recipients": [a],
        "rewritten": [(a, (a,))],
        "wire": b"Subject: x\r\n\r\n..dot\r\n",
        "_message": b"cached",
        "auth": [AuthResult("spf", "pass")],
        "facts": Facts(spf=SpfFacts("sender.test", "pass")),
        "tags": ["x.tag"],
        "quarantine": True,
    }
    for name, value in values.items():
        setattr(ctx, name, value)
    return ctx


def test_every_field_is_of_the_session_or_of_the_transaction() -> None:
    """A new field must be put on one side: else new_transaction may carry it over."""
    names = {f.name for f in dataclasses.fields(Context)}
    assert names == SESSION | TRANSACTION
    assert not SESSION & TRANSACTION


def test_new_transaction_resets_exactly_the_transactions_fields() -> None:
    ctx, before = busy(), busy()
    fresh = Context("s1", "192.0.2.1", 4000, "mx")
    ctx.new_transaction()
    for name in TRANSACTION:
        assert getattr(ctx, name) == getattr(fresh, name), name
    for name in SESSION - {"on_close"}:
        assert getattr(ctx, name) == getattr(before, name), name
    assert len(ctx.on_close) == 1


def test_a_new_transaction_shares_no_list_or_facts_with_the_last() -> None:
    ctx = busy()
    old_recipients, old_facts = ctx.recipients, ctx.facts
    ctx.new_transaction()
    ctx.recipients.append(parse_path("<b@x.test>"))
    assert len(old_recipients) == 1
    assert ctx.facts is not old_facts and ctx.facts.spf is None


def test_the_message_is_unstuffed_once_and_only_when_asked() -> None:
    ctx = Context("s", "192.0.2.1", 1, "mx")
    assert ctx.message is None
    ctx.wire = b"Subject: x\r\n\r\n..dot\r\n"
    first = ctx.message
    assert first == b"Subject: x\r\n\r\n.dot\r\n"
    assert ctx.message is first  # computed once
    other = Context("s", "192.0.2.1", 1, "mx", wire=b"..a\r\n")
    other.unstuffed(b"given")  # a large message, unstuffed in a thread
    assert other.message == b"given"
