"""Smoke tests of tests/support/mta.py: each real server starts, takes mail for
a known user straight from a client on loopback (no gateway), refuses an
unknown one with its own 550, and the delivered message and the server's log
can be read back; stop() leaves nothing running.

The replies asserted here are the servers' own, copied from real runs; the
interop tests through the gateway rely on them.
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mta import DovecotLmtp, Exim, MtaUnavailable, Postfix, _processes_marked
from tests.support.smtp import RawClient

MSG = b"From: a@sender.test\r\nTo: alice@example.test\r\nSubject: %s\r\n\r\nhello\r\n"


def nothing_left(root: Path) -> None:
    assert _processes_marked(str(root)) == []
    ps = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    assert str(root) not in ps


# ---------------------------------------------------------------------------
# Postfix


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postfix]:
    with Postfix(tmp_path_factory.mktemp("postfix"), message_size_limit=100_000) as pf:
        yield pf
    nothing_left(pf.root)
    assert not pf.root.exists()
    assert "starting the Postfix mail system" in (pf.workdir / "postfix.log").read_text()


def test_postfix_delivers_to_known_user(postfix: Postfix) -> None:
    assert postfix.url == f"smtp://127.0.0.1:{postfix.port}"
    assert postfix.greeting == "220 postfix.example.test ESMTP Postfix"
    before = len(postfix.messages("alice"))
    with smtplib.SMTP("127.0.0.1", postfix.port) as c:
        c.sendmail("a@sender.test", ["alice@example.test", "bob@example.test"], MSG % b"pf1")
    msgs = postfix.wait_messages("alice", before + 1, 10)
    assert b"Subject: pf1" in msgs[-1]
    assert b"Delivered-To: alice@example.test" in msgs[-1]
    assert b"Subject: pf1" in postfix.wait_messages("bob", 1, 10)[-1]
    line = postfix.wait_log(r"to=<alice@example\.test>, relay=virtual, .*status=sent", 10)
    assert "delivered to maildir" in line


def test_postfix_smtputf8(postfix: Postfix) -> None:
    before = len(postfix.messages("bob"))
    with smtplib.SMTP("127.0.0.1", postfix.port) as c:
        c.sendmail(
            "jörg@sender.test",
            ["bob@example.test"],
            "Subject: grüße\r\n\r\nü\r\n".encode(),
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    assert "Subject: grüße".encode() in postfix.wait_messages("bob", before + 1, 10)[-1]


def test_postfix_refuses_unknown_user_and_relay(postfix: Postfix) -> None:
    with RawClient(postfix.port, source="127.0.0.2") as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<a@sender.test>") == (250, "250 2.1.0 Ok")
        assert c.cmd("RCPT TO:<nobody@example.test>") == (
            550,
            "550 5.1.1 <nobody@example.test>: Recipient address rejected: "
            "User unknown in virtual mailbox table",
        )
        # 127.0.0.2 is not in mynetworks (127.0.0.1/32 only).
        assert c.cmd("RCPT TO:<x@elsewhere.test>") == (
            554,
            "554 5.7.1 <x@elsewhere.test>: Relay access denied",
        )
        assert c.cmd("QUIT")[0] == 221
    postfix.wait_log(r"reject: RCPT from unknown\[127\.0\.0\.2\]: 550 5\.1\.1", 10)


def test_postfix_blocked_client(postfix: Postfix) -> None:
    with RawClient(postfix.port, source="127.0.0.3") as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<alice@example.test>") == (
            554,
            "554 5.7.1 <unknown[127.0.0.3]>: Client host rejected: Access denied",
        )


def test_postfix_size_limit(postfix: Postfix) -> None:
    with RawClient(postfix.port) as c:
        c.reply()
        assert "250-SIZE 100000" in c.cmd("EHLO client.test")[1]
        assert c.cmd("MAIL FROM:<a@sender.test> SIZE=200000") == (
            552,
            "552 5.3.4 Message size exceeds fixed limit",
        )
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 1500 + b".\r\n")
        assert c.reply() == (552, "552 5.3.4 Error: message file too big")


def test_postfix_xclient(postfix: Postfix) -> None:
    with RawClient(postfix.port) as c:
        c.reply()
        ehlo = c.cmd("EHLO gw.test")[1]
        assert "250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT" in ehlo
        assert "250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT" in ehlo
        assert c.cmd("XCLIENT ADDR=127.0.0.3 NAME=[UNAVAILABLE] HELO=client.example") == (
            220,
            "220 postfix.example.test ESMTP Postfix",
        )
        ehlo = c.cmd("EHLO gw.test")[1]
        # The session is now 127.0.0.3's, which is not an authorized XCLIENT host.
        assert "XCLIENT" not in ehlo
        assert "XFORWARD" in ehlo
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 554


def test_postfix_restart_on_same_port(tmp_path: Path) -> None:
    with Postfix(tmp_path, users=("carol",), domain="restart.test") as pf:
        port = pf.port
        pf.stop()
        assert not pf.running
        nothing_left(pf.root)
        with pytest.raises(OSError):
            RawClient(port, timeout=2)
        pf.start()
        assert pf.port == port
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.sendmail("a@sender.test", ["carol@restart.test"], MSG % b"again")
        assert b"Subject: again" in pf.wait_messages("carol", 1, 10)[0]
        assert pf.log().count("starting the Postfix mail system") == 2
        root = pf.root
    nothing_left(root)
    assert not root.exists()


# ---------------------------------------------------------------------------
# Dovecot LMTP


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotLmtp]:
    with DovecotLmtp(tmp_path_factory.mktemp("dovecot")) as dc:
        yield dc
    nothing_left(dc.root)
    assert not dc.root.exists()


def lmtp_session(port: int, rcpts: list[str], subject: bytes) -> tuple[list[str], list[str]]:
    """LHLO, MAIL, each RCPT, DATA: the RCPT replies, then one reply per accepted one."""
    with RawClient(port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("LHLO gw.test")[0] == 250
        assert c.cmd("MAIL FROM:<a@sender.test>") == (250, "250 2.1.0 OK")
        rcpt_replies = [c.cmd(f"RCPT TO:<{r}>")[1] for r in rcpts]
        accepted = sum(r.startswith("250") for r in rcpt_replies)
        assert c.cmd("DATA")[0] == 354
        c.send(MSG % subject + b".\r\n")
        data_replies = [c.reply()[1] for _ in range(accepted)]
        assert c.cmd("QUIT")[0] == 221
    return rcpt_replies, data_replies


def test_dovecot_lmtp_per_recipient_replies(dovecot: DovecotLmtp) -> None:
    assert dovecot.url == f"lmtp://127.0.0.1:{dovecot.port}"
    assert dovecot.greeting.startswith("220 lmtp.example.test Dovecot")
    rcpt, data = lmtp_session(
        dovecot.port,
        ["alice@example.test", "nobody@example.test", "full@example.test", "bob@example.test"],
        b"dc1",
    )
    assert rcpt == [
        "250 2.1.5 OK",
        "550 5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test",
        "250 2.1.5 OK",
        "250 2.1.5 OK",
    ]
    assert data[0].startswith("250 2.0.0 <alice@example.test> ") and data[0].endswith(" Saved")
    assert data[1] == "552 5.2.2 <full@example.test> Quota exceeded (mailbox for user is full)"
    assert data[2].startswith("250 2.0.0 <bob@example.test> ") and data[2].endswith(" Saved")
    assert b"Subject: dc1" in dovecot.messages("alice")[-1]
    assert b"Subject: dc1" in dovecot.messages("bob")[-1]
    assert dovecot.messages("full") == []
    dovecot.wait_log(r"lmtp\(full@example\.test\).*save failed to INBOX: Quota exceeded", 5)
    assert "lmtp(alice@example.test)" in dovecot.log()


def test_dovecot_quota_tempfail(tmp_path: Path) -> None:
    with DovecotLmtp(tmp_path, users=("alice", "full"), quota_full_tempfail=True) as dc:
        rcpt, data = lmtp_session(dc.port, ["full@example.test", "alice@example.test"], b"tf")
        assert rcpt == ["250 2.1.5 OK", "250 2.1.5 OK"]
        assert data[0] == "452 4.2.2 <full@example.test> Quota exceeded (mailbox for user is full)"
        assert data[1].startswith("250 2.0.0 <alice@example.test> ")
        assert len(dc.messages("alice")) == 1
        dc.stop()
        nothing_left(dc.root)
        dc.start()
        assert lmtp_session(dc.port, ["alice@example.test"], b"again")[1][0].startswith("250")
        assert len(dc.messages("alice")) == 2


# ---------------------------------------------------------------------------
# Exim


@pytest.fixture(scope="module")
def exim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exim]:
    with Exim(tmp_path_factory.mktemp("exim"), message_size_limit="100K") as ex:
        yield ex
    nothing_left(ex.root)
    assert not ex.root.exists()


def test_exim_ehlo(exim: Exim) -> None:
    assert exim.url == f"smtp://127.0.0.1:{exim.port}"
    assert exim.greeting.startswith("220 exim.example.test ESMTP Exim 4.")
    with RawClient(exim.port) as c:
        c.reply()
        code, ehlo = c.cmd("EHLO gw.test")
    assert code == 250
    keywords = [line[4:] for line in ehlo.splitlines()[1:]]
    for kw in ("SIZE 102400", "8BITMIME", "PIPELINING", "SMTPUTF8", "DSN"):
        assert kw in keywords, ehlo


def test_exim_delivers_and_refuses(exim: Exim) -> None:
    with RawClient(exim.port) as c:
        c.reply()
        c.cmd("EHLO gw.test")
        assert c.cmd("MAIL FROM:<a@sender.test>") == (250, "250 OK")
        assert c.cmd("RCPT TO:<alice@example.test>") == (250, "250 Accepted")
        assert c.cmd("RCPT TO:<nobody@example.test>") == (550, "550 Unrouteable address")
        assert c.cmd("RCPT TO:<x@elsewhere.test>") == (550, "550 relay not permitted")
        assert c.cmd("RCPT TO:<bob@example.test>") == (250, "250 Accepted")
        assert c.cmd("DATA")[0] == 354
        c.send(MSG % b"ex1" + b".\r\n")
        code, text = c.reply()
        assert code == 250 and text.startswith("250 OK id="), text
        assert c.cmd("QUIT")[0] == 221
    assert b"Subject: ex1" in exim.wait_messages("alice", 1, 10)[-1]
    assert b"Subject: ex1" in exim.wait_messages("bob", 1, 10)[-1]
    exim.wait_log(r"=> bob <bob@example\.test> R=users T=maildir", 10)
    assert "rejected RCPT <nobody@example.test>: Unrouteable address" in exim.log()


def test_exim_size_limit(exim: Exim) -> None:
    with RawClient(exim.port) as c:
        c.reply()
        c.cmd("EHLO gw.test")
        assert c.cmd("MAIL FROM:<a@sender.test> SIZE=200000") == (
            552,
            "552 Message size exceeds maximum permitted",
        )
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 1500 + b".\r\n")
        assert c.reply() == (552, "552 Message size exceeds maximum permitted")
    exim.wait_log(r"message too big: read=\d+ max=102400", 10)


def test_exim_restart(exim: Exim) -> None:
    port = exim.port
    exim.stop()
    nothing_left(exim.root)
    exim.start()
    assert exim.port == port
    before = len(exim.messages("alice"))
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.sendmail("jörg@sender.test", ["alice@example.test"], MSG % b"ex2", ["SMTPUTF8"])
    assert b"Subject: ex2" in exim.wait_messages("alice", before + 1, 10)[-1]


def test_missing_exim_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TEST_EXIM", str(tmp_path / "no-exim"))
    with pytest.raises(MtaUnavailable, match=r"install-exim\.sh"):
        Exim(tmp_path)
