"""The gateway in front of a real Postfix (Debian's package, its own instance):
XCLIENT and XFORWARD authorised for the gateway, `message_size_limit` of 10 MB
(the gateway's own default is 25 MB), 127.0.0.3 refused by
`check_client_access`, unknown users refused with 550, Maildir delivery.

Clients come from distinct loopback addresses, all through one gateway worker,
so a backend session carried from one client to the next would show: Postfix
would judge, log and stamp the second client as the first.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from gateway.app import PREFIX_ROOM
from tests.interop.helpers import (
    client,
    gateway,
    message,
    received,
    send_one,
    subjects,
    transaction,
    transactions,
    wait_subject,
)
from tests.support.mta import Postfix
from tests.support.procs import Gateway

BLOCKED = "127.0.0.3"
BLOCKED_REPLY = "554 5.7.1 <unknown[127.0.0.3]>: Client host rejected: Access denied"


MTA = "postfix"  # the server conftest.gw puts the gateway in front of


def _queue_id_line(postfix: Postfix, client_ip: str) -> str:
    return postfix.wait_log(rf"postfix/smtpd\[\d+\]: \w+: client=\S*\[{re.escape(client_ip)}\]")


def test_a_blocked_client_then_a_good_one_are_each_judged_as_themselves(
    postfix: Postfix, gw: Gateway
) -> None:
    with client(gw.port(), BLOCKED, "blocked.example") as c:
        replies = transaction(c, "a@sender.test", ["alice@example.test"], None)
        assert replies[1] == (554, BLOCKED_REPLY)
    with client(gw.port(), "127.0.0.2", "good.example") as c:
        replies = transaction(c, "a@sender.test", ["alice@example.test"], message("good-1"))
        assert [code for code, _ in replies] == [250, 250, 354, 250], replies
    msg = wait_subject(postfix, "alice", "good-1")
    # Postfix's own Received field names the client and its HELO, not the gateway's.
    assert received(msg)[0].startswith("from good.example (unknown [127.0.0.2])"), received(msg)
    line = _queue_id_line(postfix, "127.0.0.2")
    assert "orig_client" not in line and BLOCKED not in line


def test_a_good_client_then_a_blocked_one_are_each_judged_as_themselves(
    postfix: Postfix, gw: Gateway
) -> None:
    with client(gw.port(), "127.0.0.4", "good4.example") as c:
        replies = transaction(c, "a@sender.test", ["alice@example.test"], message("good-4"))
        assert replies[-1][0] == 250, replies
    with client(gw.port(), BLOCKED, "blocked.example") as c:
        replies = transaction(c, "a@sender.test", ["alice@example.test"], message("blocked"))
        assert replies[1] == (554, BLOCKED_REPLY)
        assert replies[2][0] == 554  # DATA: no valid recipients
    msg = wait_subject(postfix, "alice", "good-4")
    assert received(msg)[0].startswith("from good4.example (unknown [127.0.0.4])")
    assert "blocked" not in subjects(postfix, "alice")


def test_one_client_sessions_transactions_share_its_backend_session_only(
    postfix: Postfix, gw: Gateway
) -> None:
    """Several transactions of one client go over one backend session (XCLIENT once);
    the next client's are judged with its own identity."""
    with client(gw.port(), "127.0.0.5", "five.example") as c:
        for n in range(3):
            replies = transaction(c, "a@sender.test", ["bob@example.test"], message(f"five-{n}"))
            assert replies[-1][0] == 250, replies
    with client(gw.port(), "127.0.0.6", "six.example") as c:
        assert transaction(c, "a@sender.test", ["bob@example.test"], message("six"))[-1][0] == 250
    for n in range(3):
        msg = wait_subject(postfix, "bob", f"five-{n}")
        assert received(msg)[0].startswith("from five.example (unknown [127.0.0.5])")
    msg = wait_subject(postfix, "bob", "six")
    assert received(msg)[0].startswith("from six.example (unknown [127.0.0.6])")


def test_an_oversized_size_is_refused_at_mail_and_leaves_nothing_for_others(
    postfix: Postfix, gw: Gateway
) -> None:
    """Postfix's 10 MB is learned at start and advertised; a larger SIZE= gets 552 at
    MAIL from the gateway. Postfix remembers a refused SIZE for the rest of its
    session until RSET, so nothing of it may reach a session another transaction uses."""
    with client(gw.port(), "127.0.0.7", "seven.example") as c:
        code, text = c.cmd("EHLO seven.example")
        assert f"250-SIZE {10_000_000 - PREFIX_ROOM}" in text.splitlines()
        code, text = c.cmd("MAIL FROM:<a@sender.test> SIZE=15000000")
        assert (code, text[:9]) == (552, "552 5.3.4")
        replies = transaction(c, "a@sender.test", ["alice@example.test"], message("seven-same"))
        assert replies[-1][0] == 250, replies
    replies = send_one(gw.port(), "127.0.0.8", "eight.example", "alice@example.test", "eight")
    assert replies[-1][0] == 250, replies
    wait_subject(postfix, "alice", "seven-same")
    wait_subject(postfix, "alice", "eight")


def test_a_size_refused_by_postfix_itself_does_not_poison_the_session(
    postfix: Postfix, tmp_path: Path
) -> None:
    """A gateway started while Postfix was down does not know its SIZE yet: the first
    oversized SIZE= reaches Postfix, which refuses it (the client hears Postfix's 552
    at its first RCPT) and would refuse every later MAIL of that session until RSET.
    The gateway resets the session before the client's next transaction, and a
    second client never sees that session at all."""
    postfix.stop()
    with gateway(postfix.url, tmp_path / "gw2") as g2:
        postfix.start()
        with client(g2.port(), "127.0.0.9", "nine.example") as c:
            code, text = c.cmd("MAIL FROM:<a@sender.test> SIZE=15000000")
            assert code == 250, text  # not known yet: MAIL goes out with the first RCPT
            code, text = c.cmd("RCPT TO:<alice@example.test>")
            assert text == "552 5.3.4 Message size exceeds fixed limit", text
            assert c.cmd("RSET")[0] == 250
            replies = transaction(c, "a@sender.test", ["alice@example.test"], message("nine"))
            assert replies[-1][0] == 250, replies
        with client(g2.port(), "127.0.0.19", "nineteen.example") as c:
            ehlo = c.cmd("EHLO nineteen.example")[1].splitlines()
            assert f"250-SIZE {10_000_000 - PREFIX_ROOM}" in ehlo
            replies = transaction(c, "a@sender.test", ["alice@example.test"], message("n19"))
            assert replies[-1][0] == 250, replies
    wait_subject(postfix, "alice", "nine")
    wait_subject(postfix, "alice", "n19")


def test_an_unknown_user_gets_postfixs_550_and_the_log_keeps_it(
    postfix: Postfix, gw: Gateway
) -> None:
    with client(gw.port(), "127.0.0.10", "ten.example") as c:
        replies = transaction(c, "a@sender.test", ["nobody@example.test"], None)
        assert replies[1] == (
            550,
            "550 5.1.1 <nobody@example.test>: Recipient address rejected:"
            " User unknown in virtual mailbox table",
        )
        assert c.cmd("QUIT")[0] == 221
    ev = gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("client") == "127.0.0.10")
    assert (ev["outcome"], ev["reason"]) == ("rejected", "backend")
    assert "User unknown in virtual mailbox table" in ev["backend"]
    assert ev["refused"][0].startswith("<nobody@example.test> 550 5.1.1")


def test_a_pipelined_transaction_with_some_recipients_refused(
    postfix: Postfix, gw: Gateway
) -> None:
    with client(gw.port(), "127.0.0.11", "eleven.example") as c:
        c.send(
            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        )
        codes = [c.reply()[0] for _ in range(5)]
        assert codes == [250, 250, 550, 250, 354]
        c.send(message("eleven") + b".\r\n")
        assert c.reply()[0] == 250
    wait_subject(postfix, "alice", "eleven")
    wait_subject(postfix, "bob", "eleven")
    # The transaction's log line follows the reply: wait for it, then there is one.
    gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("client") == "127.0.0.11")
    [ev] = transactions(gw.events(), "127.0.0.11")
    assert ev["outcome"] == "delivered" and ev["rcpts"] == 2
    assert ev["refused"][0].startswith("<nobody@example.test> 550 5.1.1")


def test_smtputf8_8bitmime_and_dsn_pass_through(postfix: Postfix, gw: Gateway) -> None:
    with client(gw.port(), "127.0.0.12", "twelve.example") as c:
        replies = transaction(
            c,
            "jörg@sender.test",
            ["alice@example.test"],
            message("ütf-8 ok", body="Grüße\r\n"),
            " SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=env-12",
        )
        assert [code for code, _ in replies] == [250, 250, 354, 250], replies
    msg = wait_subject(postfix, "alice", "ütf-8 ok")
    assert msg["Return-Path"] == "<jörg@sender.test>"
    line = postfix.wait_log(r"from=<jörg@sender.test>")
    assert "size=" in line


def test_client_values_that_do_not_fit_cost_only_that_client(postfix: Postfix, gw: Gateway) -> None:
    """Postfix refuses an XCLIENT value over 255 octets as sent: a HELO of 100 "="
    (300 octets as xtext) or 200 "é" (1,200). The gateway sends [UNAVAILABLE] in
    XCLIENT and greets with the client's address literal, so Postfix neither refuses
    the command nor records anybody else: five such clients at once do not open the
    circuit breaker, and the clients after them are still introduced by XCLIENT."""
    before = send_one(gw.port(), "127.0.0.13", "before.example", "bob@example.test", "before")
    assert before[-1][0] == 250, before
    helos = ["=" * 100, "é" * 200] * 3
    results: dict[int, list[tuple[int, str]]] = {}

    def attack(n: int) -> None:
        src = f"127.0.0.{20 + n}"
        with client(gw.port(), src, helos[n]) as c:
            results[n] = transaction(c, "a@sender.test", ["bob@example.test"], message(f"odd-{n}"))

    threads = [threading.Thread(target=attack, args=(n,)) for n in range(len(helos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r[-1][0] == 250 for r in results.values()), results
    for n in range(len(helos)):
        msg = wait_subject(postfix, "bob", f"odd-{n}")
        # Its own address, never the client before it nor the gateway.
        first = received(msg)[0]
        assert f"(unknown [127.0.0.{20 + n}])" in first, first
        if helos[n][0] == "é":  # no name that can go on a command line: its literal
            assert first.startswith(f"from [127.0.0.{20 + n}] "), first
    after = send_one(gw.port(), "127.0.0.14", "after.example", "bob@example.test", "after")
    assert after[-1][0] == 250, after
    msg = wait_subject(postfix, "bob", "after")
    assert received(msg)[0].startswith("from after.example (unknown [127.0.0.14])")
    assert gw.metric("smtp_gateway_backend_circuit_open") == 0


def test_postfix_stopped_gives_4xx_and_started_again_takes_mail(
    postfix: Postfix, gw: Gateway
) -> None:
    """Enough clients during the outage to open the circuit breaker (5 failures);
    once Postfix is back, mail is delivered again within the breaker's cooldown."""
    postfix.stop()
    try:
        for _ in range(7):
            with client(gw.port(), "127.0.0.15", "fifteen.example") as c:
                replies = transaction(c, "a@sender.test", ["alice@example.test"], message("down"))
                assert any(r[1].startswith("451 4.4.") for r in replies[:2]), replies
        assert gw.metric("smtp_gateway_backend_circuit_open") == 1
    finally:
        postfix.start()
    started = time.monotonic()
    while True:
        with client(gw.port(), "127.0.0.15", "fifteen.example") as c:
            replies = transaction(c, "a@sender.test", ["alice@example.test"], message("up again"))
        if replies[-1][0] == 250:
            break
        assert time.monotonic() - started < 10, replies
        time.sleep(0.2)
    assert time.monotonic() - started < 5 + 2  # the default cooldown, and a little
    wait_subject(postfix, "alice", "up again", timeout=10)
    assert "down" not in subjects(postfix, "alice")


def test_a_client_guessing_mailboxes_is_cut_off_after_max_errors(
    postfix: Postfix, gw: Gateway
) -> None:
    """Postfix ends a session after smtpd_hard_error_limit (20) errors; behind the
    gateway each client session would get a fresh backend session, so the gateway
    counts the backend's refusals as the client's errors and ends the session."""
    with client(gw.port(), "127.0.0.31", "guess.example") as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        codes = []
        for n in range(25):
            codes.append(c.cmd(f"RCPT TO:<guess{n}@example.test>")[0])
            if codes[-1] != 550:
                break
        assert codes[:20] == [550] * 20 and codes[20:] == [421], codes
        assert c.closed()
