"""The gateway in front of a real Exim 4 (Debian's exim4-daemon-light, unpacked
beside Postfix with its own configuration and spool), as a plain backend: no
XCLIENT, so Exim sees the gateway as its client and the client's identity is in
the gateway's own Received field; `message_size_limit` of 10M."""

from __future__ import annotations

import re

from gateway.app import PREFIX_ROOM
from tests.interop.helpers import (
    UTF8_BODY,
    client,
    down_then_up,
    message,
    pipelined_then_another,
    received,
    transaction,
    wait_subject,
)
from tests.support.mta import Exim
from tests.support.procs import Gateway

MTA = "exim"  # the server conftest.gw puts the gateway in front of


def _connection_port(exim: Exim, subject_id: str) -> str:
    """The gateway's source port for the message Exim logged with this message id:
    one per backend connection."""
    line = exim.wait_log(rf"<= a@sender\.test .*id={re.escape(subject_id)}")
    m = re.search(r"H=\S+ \[127\.0\.0\.1\]:(\d+)", line)
    assert m, line
    return m.group(1)


def test_each_client_session_has_its_own_exim_connection(exim: Exim, gw: Gateway) -> None:
    ids = []
    with client(gw.port(), "127.0.0.2", "two.example") as c:
        for n in range(2):
            mid = f"<two-{n}@sender.test>"
            data = message(f"two-{n}", extra=f"Message-ID: {mid}\r\n")
            assert transaction(c, "a@sender.test", ["alice@example.test"], data)[-1][0] == 250
            ids.append(mid.strip("<>"))
    with client(gw.port(), "127.0.0.3", "three.example") as c:
        mid = "<three@sender.test>"
        data = message("three", extra=f"Message-ID: {mid}\r\n")
        assert transaction(c, "a@sender.test", ["alice@example.test"], data)[-1][0] == 250
        ids.append(mid.strip("<>"))
    ports = [_connection_port(exim, i) for i in ids]
    assert ports[0] == ports[1] != ports[2]
    msg = wait_subject(exim, "alice", "three")
    # Exim's Received names the gateway; the gateway's, below it, the client.
    hops = received(msg)
    assert "[127.0.0.1]" in hops[0]
    assert "three.example" in hops[1] and "127.0.0.3" in hops[1]


def test_unknown_user_is_refused_with_exims_reply_and_logged(exim: Exim, gw: Gateway) -> None:
    with client(gw.port(), "127.0.0.4", "four.example") as c:
        replies = transaction(c, "a@sender.test", ["nobody@example.test"], None)
        assert replies[1] == (550, "550 Unrouteable address")
        assert c.cmd("QUIT")[0] == 221
    ev = gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("client") == "127.0.0.4")
    assert (ev["outcome"], ev["reason"], ev["backend"]) == (
        "rejected",
        "backend",
        "<nobody@example.test> 550 Unrouteable address",
    )


def test_pipelined_transaction_with_a_refused_recipient(exim: Exim, gw: Gateway) -> None:
    pipelined_then_another(exim, gw.port(), "127.0.0.5")


def test_exims_size_is_advertised_and_an_oversized_size_refused_at_mail(
    exim: Exim, gw: Gateway
) -> None:
    with client(gw.port(), "127.0.0.6", "six.example") as c:
        assert (
            f"250-SIZE {10 * 1024 * 1024 - PREFIX_ROOM}"
            in c.cmd("EHLO six.example")[1].splitlines()
        )
        code, text = c.cmd("MAIL FROM:<a@sender.test> SIZE=20000000")
        assert (code, text[:9]) == (552, "552 5.3.4")
        replies = transaction(c, "a@sender.test", ["alice@example.test"], message("six"))
        assert replies[-1][0] == 250, replies
    wait_subject(exim, "alice", "six")


def test_smtputf8_8bitmime_and_dsn_pass_through(exim: Exim, gw: Gateway) -> None:
    with client(gw.port(), "127.0.0.7", "seven.example") as c:
        replies = transaction(
            c,
            "jörg@sender.test",
            ["alice@example.test"],
            message("ütf-8", body="Grüße\r\n", extra=UTF8_BODY),
            " SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=env7",
        )
        assert [code for code, _ in replies] == [250, 250, 354, 250], replies
    msg = wait_subject(exim, "alice", "ütf-8")
    assert msg.get_content().strip() == "Grüße"
    line = exim.wait_log(r"<= jörg@sender\.test ")
    assert "ENVID" not in line or "env7" in line


def test_exim_stopped_gives_4xx_and_started_again_takes_mail(exim: Exim, gw: Gateway) -> None:
    down_then_up(exim, gw.port(), "127.0.0.8")
