"""Rspamd through a real gateway: the real rspamd (tests/support/rspamd.py, its DNS
at our test DNS server), verdicts made by markers in the Subject, the messages read
at a real backend."""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.certs import make_cert
from tests.support.delayproxy import DelayProxy
from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway, base_config, check_command
from tests.support.rspamd import RBL_ZONE, RspamdServer
from tests.support.smtp import RawClient

# Checks that would ask DNS for every message: not what these tests are about.
OTHERS_OFF = {c: {"enabled": False} for c in ("spf", "dkim", "dmarc", "arc", "dnsbl")}
LISTED_IP = "192.0.2.77"  # in the test DNS zone Rspamd's rbl module asks


@pytest.fixture(scope="module")
def rspamd_dns() -> Iterator[DnsServer]:
    dns = DnsServer(
        {".".join(reversed(LISTED_IP.split("."))) + f".{RBL_ZONE}": [("A", "127.0.0.2")]}
    )
    yield dns
    dns.close()


@pytest.fixture(scope="module")
def rspamd(
    tmp_path_factory: pytest.TempPathFactory, rspamd_dns: DnsServer
) -> Iterator[RspamdServer]:
    server = RspamdServer(tmp_path_factory.mktemp("rspamd"), rspamd_dns.address)
    yield server
    server.stop()


@pytest.fixture
def running(rspamd: RspamdServer) -> Iterator[RspamdServer]:
    """Rspamd, running at the start and again at the end (a test may stop it)."""
    if not rspamd.running:
        rspamd.start()
    yield rspamd
    if not rspamd.running:
        rspamd.start()


def policy(endpoint: str, actions: dict[str, str] | None = None, **rspamd_opts: Any) -> str:
    return yaml.safe_dump(
        {
            "extends": "default",
            "actions": actions or {},
            "checks": {
                **OTHERS_OFF,
                "rspamd": {"enabled": True, "endpoint": endpoint, **rspamd_opts},
            },
        }
    )


def gateway(
    factory: Callable[..., Gateway],
    backend: Backend,
    endpoint: str,
    actions: dict[str, str] | None = None,
    *,
    cfg: dict[str, Any] | None = None,
    **rspamd_opts: Any,
) -> Gateway:
    conf = base_config(backend.url, trusted_networks=[], **(cfg or {}))
    return factory(conf, policy=policy(endpoint, actions, **rspamd_opts))


def message(subject: str, *extra: str, body: str = "Hello.\r\n") -> bytes:
    head = [
        "From: Alice <alice@sender.test>",
        "To: bob@example.test",
        f"Subject: {subject}",
        "Message-ID: <1@sender.test>",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


def send(
    port: int,
    msg: bytes,
    rcpts: tuple[str, ...] = ("bob@example.test",),
    helo: str = "client.test",
    sender: str = "alice@sender.test",
) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo(helo)
        s.mail(sender)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        return s.data(msg)


def delivered(backend: Backend) -> EmailMessage:
    [rec] = backend.messages()
    return email.message_from_bytes(rec["data"], policy=email.policy.default)  # type: ignore[return-value]


def raw_fields(data: bytes, name: str) -> list[str]:
    """The raw values (unfolded lines joined as they are) of every `name` field."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    field = rf"(?im)^{re.escape(name)}:[ \t]?([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)"
    return [m.group(1) for m in re.finditer(field, head)]


# -- verdicts -----------------------------------------------------------------------


def test_reject_marker_is_refused_with_554_and_not_delivered(
    running: RspamdServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway(gateway_factory, backend, running.url)
    before = len(running.scans())
    assert send(gw.port(), message("GWTEST-REJECT offer")) == (
        554,
        b"5.7.1 Message rejected as spam",
    )
    assert backend.messages() == []
    assert [s["subject"] for s in running.scans()[before:]] == ["GWTEST-REJECT offer"]
    line = gw.wait_log(lambda e: e.get("event") == "transaction")
    assert line["scans"]["rspamd"]["verdict"] == "reject"
    assert "GW_REJECT(100.00)" in line["scans"]["rspamd"]["detail"]


def test_add_header_marker_is_delivered_tagged_with_our_spam_fields(
    running: RspamdServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway(gateway_factory, backend, running.url)
    # The client's own spam fields: ours are removed (X-Spam-Score), and Rspamd's
    # milter_headers asks to remove X-Spam (its remove-spam-flag routine).
    msg = message("GWTEST-TAG offer", "X-Spam-Score: -100.00", "X-Spam: no")
    assert send(gw.port(), msg)[0] == 250
    data = backend.messages()[0]["data"]
    m = delivered(backend)
    assert m["X-Gateway-Tag"] == "rspamd.add_header"
    # Exactly one X-Spam-Status: ours (Rspamd's milter block asks for its own too).
    assert m.get_all("X-Spam-Status") == ["Yes, score=25.00 required=50.00 tests=GW_TAG(25.00)"]
    assert m.get_all("X-Spam-Score") == ["25.00"]
    assert m.get_all("X-Spam-Action") == ["add header"]
    assert m.get_all("X-Spam") is None
    # Rspamd's X-Spamd-Result (an allowed name), its folding kept as folding.
    assert raw_fields(data, "X-Spamd-Result") == [
        "default: False [25.00 / 50.00];\r\n\tGW_TAG(25.00)[marker]"
    ]


def test_clean_message_is_delivered_with_its_score(
    running: RspamdServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway(gateway_factory, backend, running.url)
    assert send(gw.port(), message("lunch on friday?"))[0] == 250
    m = delivered(backend)
    assert m["X-Spam-Status"] == "No, score=0.00 required=50.00"
    assert m["X-Spam-Score"] == "0.00"
    assert m["X-Spam-Action"] == "no action"
    assert m["X-Gateway-Tag"] is None
    assert m["Subject"] == "lunch on friday?"


def test_soft_reject_defers_and_greylist_delivers(
    running: RspamdServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway(gateway_factory, backend, running.url)
    assert send(gw.port(), message("GWTEST-SOFT")) == (
        451,
        b"4.7.1 Deferred by the spam filter, try again later",
    )
    assert backend.messages() == []
    # We keep no greylist (default: accept): delivered, the action in the fields.
    assert send(gw.port(), message("GWTEST-GREY"))[0] == 250
    m = delivered(backend)
    assert m["X-Spam-Action"] == "greylist"
    assert m["X-Spam-Status"].startswith("No, score=12.00")
    assert m["X-Gateway-Tag"] is None


def test_rewrite_subject_applied_unless_the_policy_says_no(
    running: RspamdServer,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    b1, b2 = backend_factory(), backend_factory()
    on = gateway(gateway_factory, b1, running.url)
    off = gateway(gateway_factory, b2, running.url, rewrite_subject=False)
    for gw in (on, off):
        assert send(gw.port(), message("GWTEST-SUBJECT cheap watches"))[0] == 250
    rewritten, kept = delivered(b1), delivered(b2)
    assert rewritten.get_all("Subject") == ["[SPAM] GWTEST-SUBJECT cheap watches"]
    assert rewritten["X-Gateway-Tag"] == "rspamd.rewrite_subject"
    assert kept.get_all("Subject") == ["GWTEST-SUBJECT cheap watches"]
    assert kept["X-Gateway-Tag"] == "rspamd.rewrite_subject"


MILTER_NAMES = ["X-Gwtest-*", "X-Remove-Me", "Authentication-Results", "X-Spamd-*"]


def test_milter_block_applied_within_the_allowed_names_never_in_our_name(
    running: RspamdServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """GWTEST-MILTER: Rspamd asks (tests/support/rspamd.py, MILTER_RULE) to add
    allowed fields, a multi-line one, one smuggling a Bcc line, a Reply-To (not an
    allowed name), an Authentication-Results in our name (gw.test) and one in its
    own; to remove X-Remove-Me and every Received field (not an allowed name)."""
    gw = gateway(gateway_factory, backend, running.url, milter_header_names=MILTER_NAMES)
    msg = message("GWTEST-MILTER", "X-Remove-Me: 1", "X-Remove-Me: 2", "Received: from upstream")
    assert send(gw.port(), msg)[0] == 250
    data = backend.messages()[0]["data"]
    m = delivered(backend)
    assert m["X-Gwtest-Added"] == "yes"
    assert raw_fields(data, "X-Gwtest-Lines") == ["first line\r\n\tsecond line"]
    # The CRLF in the value became folding: no Bcc field, the text kept in the value.
    assert raw_fields(data, "X-Gwtest-Inject") == ["ok\r\n\tBcc: victim@example.test"]
    assert m["Bcc"] is None
    assert m["Reply-To"] is None
    ars = m.get_all("Authentication-Results")
    assert "rspamd.gwtest; spf=pass smtp.mailfrom=sender.test" in ars
    assert not any("forged.test" in a for a in ars)
    assert [a.split(";")[0] for a in ars].count("gw.test") == 1  # ours, the gateway's
    assert m["X-Remove-Me"] is None
    assert "from upstream" in m.get_all("Received")[-1]


def test_milter_block_ignored_when_the_policy_turns_it_off(
    running: RspamdServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway(
        gateway_factory,
        backend,
        running.url,
        milter_header_names=MILTER_NAMES,
        apply_milter_headers=False,
    )
    assert send(gw.port(), message("GWTEST-MILTER", "X-Remove-Me: 1"))[0] == 250
    m = delivered(backend)
    assert m["X-Gwtest-Added"] is None
    assert m["X-Spamd-Result"] is None
    assert m["X-Remove-Me"] == "1"
    assert m["X-Spam-Action"] == "no action"  # our own fields stay


# -- what Rspamd receives -----------------------------------------------------------


def test_several_recipients_one_scan_with_every_recipient(
    running: RspamdServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway(gateway_factory, backend, running.url)
    rcpts = tuple(f"user{i}@example.test" for i in range(5))
    before, conns = len(running.scans()), running.connections()
    assert send(gw.port(), message("team update"), rcpts=rcpts)[0] == 250
    [scan] = running.scans()[before:]
    assert scan["rcpts"] == list(rcpts)
    assert running.connections() == conns + 1
    assert sorted(backend.messages()[0]["rcpt_tos"]) == sorted(rcpts)


def test_envelope_and_tls_facts_reach_rspamd(
    tmp_path: Path,
    running: RspamdServer,
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
) -> None:
    cert, key = make_cert(tmp_path)
    cfg = base_config(backend.url, trusted_networks=[])
    cfg["listeners"][0].update(tls="starttls", cert_file=str(cert), key_file=str(key))
    gw = gateway_factory(cfg, policy=policy(running.url))
    before = len(running.scans())
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as s:
        s.ehlo("mx.sender.test")
        s.starttls(context=tls)
        s.ehlo("mx.sender.test")
        s.mail("")  # a bounce: the null sender
        s.rcpt("a@example.test")
        s.rcpt('"b c"@example.test')
        assert s.data(message("bounce"))[0] == 250
        version, cipher = s.sock.version(), s.sock.cipher()[0]  # type: ignore[union-attr]
    [scan] = running.scans()[before:]
    received = delivered(backend).get_all("Received")[0]
    session_id = re.search(r"with ESMTPS id (\S+)", received).group(1)  # type: ignore[union-attr]
    assert scan == {
        "ip": "127.0.0.1",
        "helo": "mx.sender.test",
        "from": "",
        "rcpts": ["a@example.test", "b c@example.test"],
        "qid": session_id,
        "tls_version": version,
        "tls_cipher": cipher,
        "subject": "bounce",
        "size": len(message("bounce")),
    }


def test_client_ip_behind_a_proxy_is_listed_through_the_test_dns(
    running: RspamdServer,
    rspamd_dns: DnsServer,
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
) -> None:
    """The client's address (from a PROXY header) is what Rspamd's rbl module looks
    up, at our DNS server: listed there, the message gets add header."""
    cfg = base_config(backend.url, trusted_networks=[], proxy_networks=["127.0.0.0/8"])
    cfg["listeners"][0]["proxy_protocol"] = True
    gw = gateway_factory(cfg, policy=policy(running.url))
    asked = rspamd_dns.asked(".".join(reversed(LISTED_IP.split("."))) + f".{RBL_ZONE}")
    before = len(running.scans())
    with RawClient(gw.port()) as c:
        c.send(f"PROXY TCP4 {LISTED_IP} 198.51.100.1 40000 25\r\n".encode())
        assert c.reply()[0] == 220
        for line in ("EHLO client.test", "MAIL FROM:<a@sender.test>", "RCPT TO:<b@example.test>"):
            assert c.cmd(line)[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(message("hi") + b".\r\n")
        assert c.reply()[0] == 250
    assert running.scans()[before]["ip"] == LISTED_IP
    assert rspamd_dns.asked(".".join(reversed(LISTED_IP.split("."))) + f".{RBL_ZONE}") > asked
    m = delivered(backend)
    assert m["X-Spam-Status"] == "Yes, score=25.00 required=50.00 tests=GW_RBL(25.00)"
    assert m["X-Gateway-Tag"] == "rspamd.add_header"


# -- failures and bounds ------------------------------------------------------------


def scanner_errors(gw: Gateway, kind: str) -> float:
    return gw.metric(f'smtp_gateway_scanner_errors_total{{kind="{kind}",scanner="rspamd"}}')


def test_rspamd_stopped_mid_run_fails_open_or_closed_as_the_policy_says(
    running: RspamdServer,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    b_open, b_closed = backend_factory(), backend_factory()
    fail_open = gateway(gateway_factory, b_open, running.url)  # default: accept
    fail_closed = gateway(
        gateway_factory, b_closed, running.url, {"rspamd.unavailable": "tempfail"}
    )
    sessions = [smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) for gw in (fail_open, fail_closed)]
    try:
        for s in sessions:
            s.ehlo("client.test")
            assert s.sendmail("a@sender.test", ["b@example.test"], message("first")) == {}
        running.stop()  # between two transactions of the same sessions
        s_open, s_closed = sessions
        assert s_open.sendmail("a@sender.test", ["b@example.test"], message("second")) == {}
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s_closed.sendmail("a@sender.test", ["b@example.test"], message("second"))
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            451,
            b"4.3.0 Spam filter unavailable, try again later",
        )
    finally:
        for s in sessions:
            s.close()
    # Fail open: delivered unscanned, so without our X-Spam fields.
    first, second = (
        email.message_from_bytes(r["data"], policy=email.policy.default) for r in b_open.messages()
    )
    assert first["X-Spam-Action"] == "no action"
    assert second["X-Spam-Action"] is None and second["Subject"] == "second"
    assert [r["data"].count(b"Subject: second") for r in b_closed.messages()] == [0]
    for gw in (fail_open, fail_closed):
        assert scanner_errors(gw, "unavailable") == 1
        line = gw.wait_log(
            lambda e: e.get("scans", {}).get("rspamd", {}).get("verdict") == "unavailable"
        )
        assert "connect" in line["scans"]["rspamd"]["detail"]


def test_slow_rspamd_times_out_and_the_policy_decides(
    running: RspamdServer,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    b_open, b_closed = backend_factory(), backend_factory()
    with DelayProxy(("127.0.0.1", running.port)) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        fail_open = gateway(gateway_factory, b_open, url, timeout=0.5)
        fail_closed = gateway(
            gateway_factory, b_closed, url, {"rspamd.timeout": "tempfail"}, timeout=0.5
        )
        proxy.stall()
        started = time.monotonic()
        assert send(fail_open.port(), message("slow"))[0] == 250
        assert send(fail_closed.port(), message("slow")) == (
            451,
            b"4.3.0 Spam filter timed out, try again later",
        )
        took = time.monotonic() - started
    assert took < 5  # two scans of 0.5 s each, not Rspamd's (stalled) answer
    assert delivered(b_open)["X-Spam-Action"] is None
    assert b_closed.messages() == []
    for gw in (fail_open, fail_closed):
        assert scanner_errors(gw, "timeout") == 1


def test_message_over_max_size_is_not_sent(
    running: RspamdServer,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    b1, b2 = backend_factory(), backend_factory()
    accepting = gateway(gateway_factory, b1, running.url, max_size=2000)
    refusing = gateway(
        gateway_factory, b2, running.url, {"rspamd.too_big": "reject"}, max_size=2000
    )
    big = message("GWTEST-REJECT big", body="x" * 70 + "\r\n" * 0 + ("y" * 70 + "\r\n") * 40)
    before = len(running.scans())
    assert send(accepting.port(), big)[0] == 250
    assert send(refusing.port(), big) == (552, b"5.3.4 Message too big to be scanned for spam")
    assert len(running.scans()) == before  # never sent: even its reject marker went unseen
    assert delivered(b1)["X-Spam-Action"] is None
    assert b2.messages() == []
    line = accepting.wait_log(lambda e: e.get("event") == "transaction")
    assert line["scans"]["rspamd"]["verdict"] == "too_big"


def test_each_scan_uses_a_connection_as_rspamd_closes_them(
    running: RspamdServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """Rspamd's normal worker answers `Connection: close`: the gateway never tries
    a closed connection again (no errors), and opens one per scan."""
    with DelayProxy(("127.0.0.1", running.port)) as proxy:
        gw = gateway(gateway_factory, backend, f"http://127.0.0.1:{proxy.port}")
        for i in range(3):
            assert send(gw.port(), message(f"note {i}"))[0] == 250
        assert proxy.connections == 3
    assert len(backend.messages()) == 3
    assert scanner_errors(gw, "unavailable") == 0
    assert scanner_errors(gw, "protocol") == 0
    assert (
        gw.metric('smtp_gateway_scanner_connections_total{result="opened",scanner="rspamd"}') == 3
    )


def test_trusted_client_is_not_scanned_unless_scan_trusted(
    running: RspamdServer,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    b1, b2 = backend_factory(), backend_factory()
    # base_config's default trusted_networks: loopback, where the test connects from.
    skip = gateway_factory(base_config(b1.url), policy=policy(running.url))
    scan = gateway_factory(base_config(b2.url), policy=policy(running.url, scan_trusted=True))
    before = len(running.scans())
    assert send(skip.port(), message("GWTEST-REJECT from inside"))[0] == 250
    assert len(running.scans()) == before
    assert delivered(b1)["X-Spam-Action"] is None
    assert send(scan.port(), message("GWTEST-REJECT from inside"))[0] == 554
    assert len(running.scans()) == before + 1


# -- smtp-gateway check ---------------------------------------------------------------


def test_check_command_shows_the_rspamd_verdict(tmp_path: Path, running: RspamdServer) -> None:
    pol = tmp_path / "policy.yaml"
    pol.write_text(policy(running.url))
    before = len(running.scans())
    r = check_command(
        tmp_path,
        message("GWTEST-TAG offer"),
        *("--mail-from", "alice@sender.test", "--rcpt", "bob@example.test", "--json"),
        policy=str(pol),
    )
    out = json.loads(r.stdout)
    assert r.returncode == 3, r.stderr  # tag
    assert out["action"] == "tag"
    assert out["scans"] == [
        {
            "scanner": "rspamd",
            "verdict": "add_header",
            "detail": "add header, score 25.00/50.00; GW_TAG(25.00)",
        }
    ]
    assert "X-Spam-Status: Yes, score=25.00" in out["added_fields"]
    [scan] = running.scans()[before:]
    assert (scan["ip"], scan["helo"], scan["from"]) == (
        "192.0.2.10",
        "client.test",
        "alice@sender.test",
    )
