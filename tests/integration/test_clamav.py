"""Virus scanning with the real clamd, through real gateway processes.

One clamd for the module (tests/support/clamd.py: its own signatures, written
here, nothing downloaded), on a Unix socket and a loopback TCP port; a delay
proxy (tests/support/delayproxy.py) in front of it where a test counts
connections or needs a clamd that does not answer.
"""

from __future__ import annotations

import base64
import json
import smtplib
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.clamd import ATTACHMENT, EICAR, MARKER, SIGNATURES, Clamd
from tests.support.delayproxy import DelayProxy
from tests.support.procs import Backend, Gateway, base_config, check_command

pytestmark = pytest.mark.integration

# clamd's StreamMaxLength here: small, so a message above it is cheap to send.
STREAM_MAX = 256 * 1024

# Only the virus scan: the sender checks would ask DNS.
OFF = (
    "  spf: {enabled: false}\n  dkim: {enabled: false}\n  arc: {enabled: false}\n"
    "  dmarc: {enabled: false}\n"
)


def message(body: bytes, subject: str = "test") -> bytes:
    return (
        b"From: a@sender.test\r\nTo: x@example.test\r\nSubject: "
        + subject.encode()
        + b"\r\n\r\n"
        + body
        + b"\r\n"
    )


def with_attachment(data: bytes) -> bytes:
    b64 = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        b"From: a@sender.test\r\nTo: x@example.test\r\nSubject: attached\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BOUND\r\n\r\n"
        b"--BOUND\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--BOUND\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="data.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--BOUND--\r\n"
    )


CLEAN = message(b"Hello, nothing to see here.")


def send(port: int, msg: bytes, rcpts: tuple[str, ...] = ("x@example.test",)) -> tuple[int, str]:
    """The reply to DATA (or to the first refused command)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        code, text = s.mail("a@sender.test")
        if code != 250:
            return code, text.decode()
        for r in rcpts:
            code, text = s.rcpt(r)
            if code != 250:
                return code, text.decode()
        code, text = s.data(msg)
        return code, text.decode()


def metrics_text(gw: Gateway) -> str:
    with urllib.request.urlopen(gw.metrics_url + "/metrics", timeout=5) as r:
        return str(r.read().decode())


def transaction(gw: Gateway, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return gw.wait_log(lambda e: e.get("event") == "transaction" and pred(e))


def scan_of(e: dict[str, Any]) -> dict[str, Any]:
    return dict(e.get("scans", {}).get("clamav", {}))


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    server = Clamd(tmp_path_factory.mktemp("clamd"), stream_max=STREAM_MAX)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    b = Backend(tmp_path_factory.mktemp("spool"), "--xclient")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory, backend: Backend
) -> Iterator[Callable[..., Gateway]]:
    """Gateways scanning with clamd at `endpoint`; `clamav` and `actions` add
    policy lines. Stopped at the end of the module."""
    started: list[Gateway] = []

    def make(endpoint: str, clamav: str = "", actions: str = "") -> Gateway:
        policy = (
            "extends: default\n"
            + ("actions:\n" + actions if actions else "")
            + "checks:\n"
            + OFF
            + f"  clamav:\n    enabled: true\n    endpoint: {endpoint}\n"
            + clamav
        )
        cfg = base_config(backend.url, trusted_networks=[])
        gw = Gateway(tmp_path_factory.mktemp("gw"), cfg, policy=policy)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def gw(gateways: Callable[..., Gateway], clamd: Clamd) -> Gateway:
    """The default policy's actions, clamd over TCP."""
    return gateways(clamd.tcp)


# -- verdicts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "msg"),
    [
        ("marker", message(b"payload " + MARKER)),
        ("eicar", message(EICAR)),
        ("attachment", with_attachment(ATTACHMENT)),  # found only in the decoded MIME part
    ],
)
def test_an_infected_message_is_refused_naming_no_signature(
    gw: Gateway, backend: Backend, clamd: Clamd, kind: str, msg: bytes
) -> None:
    delivered = len(backend.messages())
    n = len(clamd.results())
    code, text = send(gw.port(), msg)
    assert (code, text) == (554, "5.7.0 Message rejected: virus found")
    assert len(backend.messages()) == delivered
    signature = SIGNATURES[kind]
    assert clamd.wait_results(n + 1)[n:] == [f"{signature} FOUND"]
    # The signature is in the transaction's log line, and nowhere in the metrics.
    e = transaction(gw, lambda e: scan_of(e).get("detail") == signature)
    assert (e["outcome"], e["reason"], scan_of(e)["verdict"]) == (
        "rejected",
        "virus.found",
        "infected",
    )
    body = metrics_text(gw)
    assert 'smtp_gateway_check_results_total{check="clamav",symbol="virus.found"}' in body
    assert signature.split(".")[0] not in body and "UNOFFICIAL" not in body


def test_a_clean_message_is_delivered_as_it_was_scanned(
    gw: Gateway, backend: Backend, clamd: Clamd
) -> None:
    delivered = len(backend.messages())
    before = gw.metric('smtp_gateway_scan_seconds_count{scanner="clamav"}')
    # A line starting with a dot: the scanner sees it as the recipient will.
    body = b".hidden " + MARKER[:10] + b"\r\nclean"
    assert send(gw.port(), message(body))[0] == 250
    assert len(backend.messages()) == delivered + 1
    assert b"\r\n.hidden " in backend.messages()[-1]["data"]
    assert gw.metric('smtp_gateway_scan_seconds_count{scanner="clamav"}') == before + 1
    e = transaction(gw, lambda e: scan_of(e).get("verdict") == "clean")
    assert e["outcome"] == "delivered"


def test_several_recipients_one_scan(gw: Gateway, backend: Backend, clamd: Clamd) -> None:
    """DATA-stage checks run once per transaction: three recipients, one scan at
    clamd (its log counts every INSTREAM), one delivery to all three."""
    n = len(clamd.results())
    rcpts = ("x@example.test", "y@example.test", "z@example.test")
    assert send(gw.port(), CLEAN, rcpts)[0] == 250
    assert sorted(backend.messages()[-1]["rcpt_tos"]) == sorted(rcpts)
    assert clamd.wait_results(n + 1)[n:] == ["OK"]
    # One more, single-recipient message: had the first been scanned per recipient,
    # its other scans would show up by now.
    assert send(gw.port(), CLEAN)[0] == 250
    assert clamd.wait_results(n + 2)[n:] == ["OK", "OK"]
    assert len(clamd.results()) == n + 2


def test_unix_socket(gateways: Callable[..., Gateway], backend: Backend, clamd: Clamd) -> None:
    unix = gateways(clamd.unix)
    delivered = len(backend.messages())
    n = len(clamd.results())
    assert send(unix.port(), message(MARKER))[0] == 554
    assert send(unix.port(), CLEAN)[0] == 250
    assert len(backend.messages()) == delivered + 1
    assert sorted(clamd.wait_results(n + 2)[n:]) == ["Gateway.Test.Marker.UNOFFICIAL FOUND", "OK"]
    assert unix.metric('smtp_gateway_scanner_errors_total{scanner="clamav"') == 0


def test_one_clamd_session_serves_many_messages(
    gateways: Callable[..., Gateway], clamd: Clamd
) -> None:
    """IDSESSION: three messages, one after the other, over one connection."""
    with DelayProxy(("127.0.0.1", clamd.port)) as proxy:
        g = gateways(proxy.endpoint)
        n = len(clamd.results())
        assert [send(g.port(), m)[0] for m in (CLEAN, message(MARKER), CLEAN)] == [250, 554, 250]
        assert clamd.wait_results(n + 3)[n:].count("OK") == 2
        assert proxy.connections == 1
        opened = 'smtp_gateway_scanner_connections_total{result="opened",scanner="clamav"}'
        reused = 'smtp_gateway_scanner_connections_total{result="reused",scanner="clamav"}'
        assert (g.metric(opened), g.metric(reused)) == (1, 2)


# -- sizes ---------------------------------------------------------------------------------


def test_a_message_over_max_size_is_not_sent_to_clamd(
    gateways: Callable[..., Gateway], backend: Backend, clamd: Clamd
) -> None:
    small = gateways(clamd.tcp, clamav="    max_size: 2000\n")
    n = len(clamd.results())
    delivered = len(backend.messages())
    big = message(MARKER + b"\r\n" + b"x" * 70 + (b"\r\n" + b"y" * 70) * 40)
    assert len(big) > 2000
    assert send(small.port(), big)[0] == 250  # clamav.too_big: accept (the default)
    assert len(backend.messages()) == delivered + 1
    e = transaction(small, lambda e: scan_of(e).get("verdict") == "too_big")
    assert e["outcome"] == "delivered"
    assert (
        small.metric('smtp_gateway_check_results_total{check="clamav",symbol="clamav.too_big"}')
        == 1
    )
    # The next, small message is scanned: it is the only one clamd saw.
    assert send(small.port(), CLEAN)[0] == 250
    assert clamd.wait_results(n + 1)[n:] == ["OK"]
    assert len(clamd.results()) == n + 1


def test_clamd_refusing_a_stream_over_its_limit_defers_it_unscanned(
    gw: Gateway, backend: Backend, clamd: Clamd
) -> None:
    """max_size above clamd's StreamMaxLength (a misconfiguration): clamd stops
    reading, answers and closes while the message is still being sent; the
    answer is read all the same, and named in a warning. The message is not
    delivered unscanned: clamav.unavailable (tempfail by default) decides."""
    line = b"z" * 76 + b"\r\n"
    # Far more than the socket buffers hold, so sending fails once clamd closes.
    big = message(line * (16 * STREAM_MAX // len(line)))
    assert len(big) > STREAM_MAX
    delivered = len(backend.messages())
    assert send(gw.port(), big)[0] == 451
    assert len(backend.messages()) == delivered
    e = transaction(gw, lambda e: scan_of(e).get("verdict") == "unavailable")
    assert "size limit" in scan_of(e)["detail"]
    gw.wait_log(lambda e: "StreamMaxLength" in str(e.get("msg", "")))
    assert send(gw.port(), message(MARKER))[0] == 554  # a new session for the next


# -- clamd down or slow -------------------------------------------------------------------


@pytest.mark.parametrize("closed", [False, True], ids=["fail-open", "fail-closed"])
def test_clamd_stopped_mid_run(
    gateways: Callable[..., Gateway], backend: Backend, clamd: Clamd, closed: bool
) -> None:
    actions = "" if closed else "  clamav.unavailable: accept\n"
    g = gateways(clamd.tcp, actions=actions)
    assert send(g.port(), CLEAN)[0] == 250  # a kept session to clamd now
    delivered = len(backend.messages())
    clamd.stop()
    try:
        code, text = send(g.port(), message(MARKER))
        if closed:
            assert (code, text) == (451, "4.3.0 Virus scanner unavailable, try again later")
            assert len(backend.messages()) == delivered
        else:
            assert code == 250  # unscanned: the policy's choice
            assert len(backend.messages()) == delivered + 1
        assert (
            g.metric('smtp_gateway_scanner_errors_total{kind="unavailable",scanner="clamav"}') >= 1
        )
        g.wait_log(lambda e: "clamav scan failed (unavailable)" in str(e.get("msg", "")))
    finally:
        clamd.start()
    # clamd back: scanning again, its old session replaced by a new one.
    assert send(g.port(), message(MARKER))[0] == 554


def test_a_silent_clamd_is_a_timeout_within_the_deadline(
    gateways: Callable[..., Gateway], backend: Backend, clamd: Clamd
) -> None:
    with DelayProxy(("127.0.0.1", clamd.port)) as proxy:
        g = gateways(proxy.endpoint, clamav="    timeout: 0.5\n")
        proxy.stall()
        delivered = len(backend.messages())
        start = time.monotonic()
        code, text = send(g.port(), CLEAN)
        took = time.monotonic() - start
        proxy.wait_held()  # the scan did reach the (silent) clamd
        assert (code, text) == (451, "4.3.0 Virus scan timed out, try again later")
        assert 0.5 <= took < 3
        assert len(backend.messages()) == delivered
        assert g.metric('smtp_gateway_scanner_errors_total{kind="timeout",scanner="clamav"}') == 1
        # The scan's own deadline answered, not the runner's timer after it.
        g.wait_log(lambda e: "clamav scan failed (timeout)" in str(e.get("msg", "")))
        assert not any("check clamav timed out" in str(e.get("msg", "")) for e in g.events())
        proxy.resume()
        assert send(g.port(), CLEAN)[0] == 250
        assert len(backend.messages()) == delivered + 1


# -- explaining -----------------------------------------------------------------------------


def test_check_command_shows_the_clamav_verdict(tmp_path: Path, clamd: Clamd) -> None:
    (tmp_path / "policy.yaml").write_text(
        f"extends: default\nchecks:\n{OFF}  clamav:\n    enabled: true\n"
        f"    endpoint: {clamd.unix}\n"
    )

    def check(msg: bytes, *extra: str) -> subprocess.CompletedProcess[str]:
        return check_command(
            tmp_path,
            msg,
            *("--mail-from", "a@sender.test", "--rcpt", "x@example.test", *extra),
            policy=str(tmp_path / "policy.yaml"),
            dns={"nameservers": ["127.0.0.1:9"]},
        )

    r = check(message(MARKER), "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 6, r.stderr
    assert (out["action"], out["deciding_symbol"]) == ("reject", "virus.found")
    assert out["reply"] == "554 5.7.0 Message rejected: virus found"
    assert {"stage": "data", "symbols": ["virus.found"], "action": "reject"} in out["stages"]
    assert out["scans"] == [
        {"scanner": "clamav", "verdict": "infected", "detail": SIGNATURES["marker"]}
    ]
    text = check(message(MARKER))
    assert f"clamav: infected ({SIGNATURES['marker']})" in text.stdout
    clean = check(CLEAN, "--json")
    assert clean.returncode == 0
    assert json.loads(clean.stdout)["scans"] == [
        {"scanner": "clamav", "verdict": "clean", "detail": ""}
    ]
