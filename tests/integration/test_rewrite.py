"""Address rewriting through real SMTP sessions, against a real backend."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest

from tests.support.dkimkeys import rsa_key, sign
from tests.support.procs import Backend, Gateway, base_config

POLICY = """
rewrite:
  original_recipient_header: X-Original-To
  canonical_recipient:
    rules: {"@old.test": "@example.test"}
    headers: true
  canonical_sender:
    rules: {"/^(.*)@legacy\\\\.test$/": "$1@example.test"}
    headers: true
  virtual_alias:
    file: aliases
  masquerade:
    domains: [example.test]
    exceptions: [root]
  srs:
    enabled: true
    domain: srs.example.test
    secrets: [first-secret]
"""
ALIASES = """\
# fan-out, forwarding, a loop
team@example.test alice@example.test, bob@example.test, carol@example.test
fwd@example.test friend@outside.test
loop1@example.test loop2@example.test
loop2@example.test loop1@example.test
"""


@pytest.fixture
def gw(tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]) -> Gateway:
    (tmp_path / "gw0").mkdir()
    (tmp_path / "gw0" / "aliases").write_text(ALIASES)
    cfg = base_config(backend.url, local_domains=["example.test", "old.test", "srs.example.test"])
    return gateway_factory(cfg, policy=POLICY)


def transaction(
    port: int, sender: str, rcpts: list[str], msg: bytes
) -> tuple[list[tuple[int, bytes]], tuple[int, bytes] | None]:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.test")
        assert s.mail(sender)[0] == 250
        replies = [s.rcpt(r) for r in rcpts]
        if not any(c == 250 for c, _ in replies):
            return replies, None
        return replies, s.data(msg)


def test_backend_sees_rewritten_envelope_and_headers(gw: Gateway, backend: Backend) -> None:
    msg = (
        b'From: "Doe, Joe" <joe@host.example.test>\r\n'
        b"To: Team <team@old.test>\r\n"
        b"Cc: other@elsewhere.test\r\n"
        b"Subject: about team@old.test\r\n\r\nhello\r\n"
    )
    replies, data = transaction(gw.port(), "joe@host.example.test", ["team@old.test"], msg)
    assert replies[0][0] == 250 and data is not None and data[0] == 250
    [m] = backend.messages()
    # One transaction, three envelopes' worth: the alias fanned out after canonical.
    assert m["rcpt_tos"] == ["alice@example.test", "bob@example.test", "carol@example.test"]
    assert m["mail_from"] == "joe@example.test"  # masqueraded
    head = m["data"].split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert b'From: "Doe, Joe" <joe@example.test>\r\n' in head
    assert b"To: Team <team@example.test>\r\n" in head
    assert b"Cc: other@elsewhere.test\r\n" in head
    assert b"Subject: about team@old.test\r\n" in head  # not an address header
    assert b"X-Original-To: team@old.test\r\n" in head
    ev = gw.wait_log(lambda e: e.get("event") == "transaction")
    assert ev["mail_from"] == "joe@host.example.test"
    assert ev["backend_sender"] == "joe@example.test"
    assert ev["rewritten"] == {
        "team@old.test": ["alice@example.test", "bob@example.test", "carol@example.test"]
    }


def test_alias_loop_is_refused_and_other_recipients_pass(gw: Gateway, backend: Backend) -> None:
    replies, data = transaction(
        gw.port(), "a@sender.test", ["loop1@example.test", "dave@example.test"], b"\r\nx\r\n"
    )
    assert replies[0][0] == 550 and replies[0][1].startswith(b"5.4.6")
    assert replies[1][0] == 250 and data is not None and data[0] == 250
    [m] = backend.messages()
    assert m["rcpt_tos"] == ["dave@example.test"]
    assert not any("loop" in c for c in backend.commands())


def test_srs_when_forwarding_and_bounces_reversed(gw: Gateway, backend: Backend) -> None:
    replies, data = transaction(
        gw.port(),
        "sender@orig.test",
        ["alice@example.test", "fwd@example.test"],
        b"Subject: fwd\r\n\r\nx\r\n",
    )
    assert [c for c, _ in replies] == [250, 250] and data is not None and data[0] == 250
    [m] = backend.messages()
    # The forwarded recipient made the whole transaction SRS (re-opened at the backend).
    assert m["mail_from"].startswith("SRS0=") and m["mail_from"].endswith(
        "=orig.test=sender@srs.example.test"
    )
    assert m["rcpt_tos"] == ["alice@example.test", "friend@outside.test"]
    # A bounce to that address goes back to the original sender.
    srs_addr = m["mail_from"]
    replies, data = transaction(gw.port(), "<>", [srs_addr], b"Subject: bounce\r\n\r\nx\r\n")
    assert replies[0][0] == 250 and data is not None and data[0] == 250
    assert backend.messages()[1]["rcpt_tos"] == ["sender@orig.test"]
    # Forged or altered: refused.
    local, _, dom = srs_addr.partition("@")
    forged = local.replace("=sender", "=victim") + "@" + dom
    replies, _ = transaction(gw.port(), "<>", [forged], b"\r\nx\r\n")
    assert replies[0][0] == 550 and replies[0][1].startswith(b"5.1.1")
    assert len(backend.messages()) == 2


def test_srs_addresses_take_bounces_only_and_guessing_is_cut_short(
    gw: Gateway, backend: Backend
) -> None:
    """A valid SRS address written to by a sender that is not a bounce is refused:
    reversing it would relay that sender's mail to the original address. A client
    that tries invalid ones (guessing the hash) gets five answers, then 450 4.7.1
    for every SRS address, valid ones included, for the rest of the hour; other
    clients are not affected."""
    _, data = transaction(gw.port(), "sender@orig.test", ["fwd@example.test"], b"\r\nx\r\n")
    assert data is not None and data[0] == 250
    srs_addr = backend.messages()[0]["mail_from"]
    local, _, dom = srs_addr.partition("@")
    assert len(local.split("=")[1]) == 12  # the hash: 60 bits of base32
    replies, _ = transaction(gw.port(), "spammer@elsewhere.test", [srs_addr], b"\r\nx\r\n")
    assert replies[0][0] == 550 and replies[0][1].startswith(b"5.1.1")
    guesses = [f"SRS0={'A' * 12}={local.split('=')[2]}=orig.test=user{n}@{dom}" for n in range(4)]
    replies, _ = transaction(gw.port(), "<>", guesses, b"\r\nx\r\n")
    assert [c for c, _ in replies] == [550] * 4  # the fifth failure with the first above
    replies, _ = transaction(gw.port(), "<>", [srs_addr], b"\r\nx\r\n")
    assert replies[0][0] == 450 and replies[0][1].startswith(b"4.7.1"), replies
    # Another address (another /24 is not needed: the network's share is larger).
    with smtplib.SMTP("127.0.0.1", gw.port(), source_address=("127.0.0.9", 0)) as s:
        s.ehlo("bounces.test")
        s.mail("<>")
        assert s.rcpt(srs_addr)[0] == 250
    assert len(backend.messages()) == 1  # nothing was relayed by the refused ones


def test_local_mail_keeps_the_original_sender(gw: Gateway, backend: Backend) -> None:
    _, data = transaction(gw.port(), "sender@orig.test", ["alice@example.test"], b"\r\nx\r\n")
    assert data is not None and data[0] == 250
    assert backend.messages()[0]["mail_from"] == "sender@orig.test"


def test_dkim_signature_still_verifies_when_headers_are_not_rewritten(
    gw: Gateway, backend: Backend
) -> None:
    key = rsa_key()
    msg = sign(
        b"From: Alice <alice@signer.test>\r\nTo: team@example.test\r\nSubject: signed\r\n"
        b"Date: Sun, 22 Nov 2026 08:00:00 +0000\r\nMessage-ID: <1@signer.test>\r\n\r\n"
        b"body line\r\n",
        key,
        "signer.test",
        "sel",
    )
    # Envelope rewriting applies (canonical + alias), the signed headers match no rule.
    _, data = transaction(gw.port(), "alice@signer.test", ["team@old.test"], msg)
    assert data is not None and data[0] == 250
    delivered = backend.messages()[0]["data"]
    assert delivered.endswith(msg)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.signer.test."
        return key.dns.encode()

    assert dkim.verify(delivered, dnsfunc=dns)
    # The control: had the signed To been rewritten, it would not verify.
    tampered = delivered.replace(b"To: team@example.test", b"To: team@example.org")
    assert not dkim.verify(tampered, dnsfunc=dns)


def test_alias_file_reloads_with_the_policy(gw: Gateway, backend: Backend, tmp_path: Path) -> None:
    (tmp_path / "gw0" / "aliases").write_text("team@example.test erin@example.test\n")
    gw.signal(signal.SIGHUP)
    gw.wait_log(lambda e: e.get("event") == "reloaded")
    _, data = transaction(gw.port(), "a@sender.test", ["team@example.test"], b"\r\nx\r\n")
    assert data is not None and data[0] == 250
    assert backend.messages()[0]["rcpt_tos"] == ["erin@example.test"]


def test_rewrite_command_shows_each_stage(gw: Gateway) -> None:
    def run(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "rewrite", *args, "-c", str(gw.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout

    rcpt = run("team+x@old.test", "--recipient")
    assert "canonical_recipient  team+x@example.test" in rcpt
    assert "relay control        local: accepted" in rcpt
    assert (
        "virtual_alias        alice+x@example.test, bob+x@example.test, carol+x@example.test"
        in rcpt
    )
    assert "alias loop" in run("loop1@example.test", "--recipient")
    assert "not local" in run("x@outside.test", "--recipient")
    sender = run("joe@legacy.test", "--sender")
    assert "canonical_sender     joe@example.test" in sender
    assert "srs_forward          SRS0=" in sender


def test_policy_and_tables_reload_when_their_files_change(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """No SIGHUP: a ConfigMap update (here a table file rewritten) is noticed."""
    work = tmp_path / "gw0"
    work.mkdir()
    (work / "aliases").write_text("team@example.test alice@example.test\n")
    cfg = base_config(backend.url, policy_reload_interval=0.2)
    gw = gateway_factory(cfg, policy="rewrite:\n  virtual_alias: {file: aliases}\n")
    _, data = transaction(gw.port(), "a@sender.test", ["team@example.test"], b"\r\nx\r\n")
    assert data is not None and backend.messages()[0]["rcpt_tos"] == ["alice@example.test"]
    (work / "aliases").write_text("team@example.test frank@example.test\n")
    gw.wait_log(lambda e: e.get("event") == "reloaded")
    _, data = transaction(gw.port(), "a@sender.test", ["team@example.test"], b"\r\nx\r\n")
    assert data is not None and backend.messages()[1]["rcpt_tos"] == ["frank@example.test"]
    # A broken policy is refused and the running one stays.
    (work / "policy.yaml").write_text("rewrite:\n  virtual_alias: {nonsense: 1}\n")
    ev = gw.wait_log(lambda e: e.get("event") == "reload_failed")
    assert "virtual_alias.nonsense" in ev["error"]
    _, data = transaction(gw.port(), "a@sender.test", ["team@example.test"], b"\r\nx\r\n")
    assert data is not None and backend.messages()[2]["rcpt_tos"] == ["frank@example.test"]
