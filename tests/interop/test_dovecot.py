"""The gateway in front of a real Dovecot LMTP server (Debian's dovecot-lmtpd, its
own instance): one reply per recipient after the message, an unknown user
refused at RCPT, a full mailbox refused after the message.

LMTP delivers to each recipient on its own, so one message can be delivered to
some and refused for good to others; an SMTP client can hear only one reply.
The gateway answers with a 5xx that names the refused recipients (the others
have their copy, and a retry would deliver it again), or a 4xx when any
refusal was temporary.
"""

from __future__ import annotations

from tests.interop.helpers import (
    UTF8_BODY,
    client,
    down_then_up,
    message,
    pipelined_then_another,
    subjects,
    transaction,
    wait_subject,
)
from tests.support.mta import DovecotLmtp
from tests.support.procs import Gateway

MTA = "dovecot"  # the server conftest.gw puts the gateway in front of


def test_unknown_user_and_full_mailbox_among_several_recipients(
    dovecot: DovecotLmtp, gw: Gateway
) -> None:
    rcpts = ["alice@example.test", "nobody@example.test", "full@example.test", "bob@example.test"]
    with client(gw.port(), "127.0.0.2", "two.example") as c:
        replies = transaction(c, "a@sender.test", rcpts, message("several"))
    assert replies[2] == (
        550,
        "550 5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test",
    )
    assert [code for code, _ in replies] == [250, 250, 550, 250, 250, 354, 554], replies
    assert replies[-1][1].split("\n") == [
        "554-5.3.0 Delivered to 2 of 3 recipients; the next hop refused:",
        "554 5.3.0 <full@example.test> 552 5.2.2 <full@example.test> Quota exceeded"
        " (mailbox for user is full)",
    ]
    wait_subject(dovecot, "alice", "several")
    wait_subject(dovecot, "bob", "several")
    assert "several" not in subjects(dovecot, "full")
    ev = gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("client") == "127.0.0.2")
    assert ev["outcome"] == "rejected" and ev["rcpts"] == 3
    assert ev["refused"] == [
        "<nobody@example.test> 550 5.1.1 <nobody@example.test> User doesn't exist:"
        " nobody@example.test"
    ]


def test_pipelined_recipients_and_the_next_transaction_on_the_same_session(
    dovecot: DovecotLmtp, gw: Gateway
) -> None:
    pipelined_then_another(dovecot, gw.port(), "127.0.0.3")


def test_8bitmime_passes_and_smtputf8_is_kept_to_what_dovecot_offers(
    dovecot: DovecotLmtp, gw: Gateway
) -> None:
    """Dovecot 2.3's LMTP offers 8BITMIME but neither SMTPUTF8 nor DSN: the gateway
    drops those parameters for ASCII mail, and refuses a UTF-8 address (553 5.6.7)
    rather than pass it to a server that did not offer to take it."""
    with client(gw.port(), "127.0.0.4", "four.example") as c:
        params = " SMTPUTF8 BODY=8BITMIME RET=HDRS"
        data = message("8bit", body="Grüße\r\n", extra=UTF8_BODY)
        replies = transaction(c, "a@sender.test", ["alice@example.test"], data, params)
        assert [code for code, _ in replies] == [250, 250, 354, 250], replies
        replies = transaction(c, "jörg@sender.test", ["alice@example.test"], None, " SMTPUTF8")
        assert replies[1][1].startswith("553 5.6.7 "), replies
    msg = wait_subject(dovecot, "alice", "8bit")
    assert msg.get_content().strip() == "Grüße"


def test_dovecot_stopped_gives_4xx_and_started_again_takes_mail(
    dovecot: DovecotLmtp, gw: Gateway
) -> None:
    down_then_up(dovecot, gw.port(), "127.0.0.5")
