"""Listener behaviour: EHLO, limits, TLS, PROXY protocol, smuggling."""

from __future__ import annotations

import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.certs import make_cert
from tests.support.procs import ROOT, Backend, Gateway, base_config, free_port
from tests.support.smtp import RawClient

MSG = b"Subject: t\r\n\r\nhello\r\n"


def test_ehlo_advertises_exactly_the_inbound_extensions(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path)
    cfg = base_config(backend.url, limits={"max_message_size": 123456})
    cfg["listeners"][0].update(tls="starttls", cert_file=str(cert), key_file=str(key))
    gw = gateway_factory(cfg)
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        code, _ = s.ehlo("client.test")
        assert code == 250
        assert s.esmtp_features["size"] == "123456"
        for ext in ("8bitmime", "smtputf8", "enhancedstatuscodes", "starttls", "pipelining"):
            assert ext in s.esmtp_features, ext
        assert "auth" not in s.esmtp_features
        assert "chunking" not in s.esmtp_features
        s.starttls(context=_client_ctx(cert))
        s.ehlo("client.test")
        assert "starttls" not in s.esmtp_features
        assert "auth" not in s.esmtp_features


def _client_ctx(cert: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    return ctx


def test_require_tls_listener(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path)
    cfg = base_config(backend.url)
    cfg["listeners"][0].update(
        tls="starttls", cert_file=str(cert), key_file=str(key), require_tls=True
    )
    gw = gateway_factory(cfg)
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        code, msg = s.mail("a@sender.test")
        assert (code, msg[:5]) == (530, b"5.7.0")
        s.starttls(context=_client_ctx(cert))
        s.ehlo("client.test")
        assert s.mail("a@sender.test")[0] == 250
        assert s.rcpt("x@example.test")[0] == 250
        assert s.data(MSG)[0] == 250
    [m] = backend.messages()
    assert b"with ESMTPS" in m["data"] and b"version=TLS" in m["data"]


def test_implicit_tls_listener(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path)
    cfg = base_config(backend.url)
    cfg["listeners"][0].update(
        tls="implicit", cert_file=str(cert), key_file=str(key), require_tls=True
    )
    gw = gateway_factory(cfg)
    with smtplib.SMTP_SSL("127.0.0.1", gw.port(), context=_client_ctx(cert)) as s:
        s.ehlo("client.test")
        assert s.mail("a@sender.test")[0] == 250
        s.rcpt("x@example.test")
        assert s.data(MSG)[0] == 250
    assert len(backend.messages()) == 1


def test_starttls_injection_is_discarded(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path)
    cfg = base_config(backend.url)
    cfg["listeners"][0].update(tls="starttls", cert_file=str(cert), key_file=str(key))
    gw = gateway_factory(cfg)
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert c.reply()[0] == 220
        ctx = _client_ctx(cert)
        tls = ctx.wrap_socket(c.sock, server_hostname="gw.test")
        tls.sendall(b"EHLO client.test\r\n")
        c.sock = tls
        assert c.reply()[0] == 250
        # Had the injected MAIL run, this RCPT would be accepted; instead: need MAIL.
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 503
    assert not any("injected" in cmd for cmd in backend.commands())


def test_size_limit_declared_and_actual(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, limits={"max_message_size": 2048}))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        code, text = c.cmd("MAIL FROM:<a@sender.test> SIZE=4096")
        assert code == 552 and "5.3.4" in text
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 200 + b".\r\n")
        code, text = c.reply()
        assert code == 552 and "5.3.4" in text
        # The session survives and the next, small, message goes through.
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(MSG + b".\r\n")
        assert c.reply()[0] == 250
    assert len(backend.messages()) == 1


def test_recipient_limit_and_command_line_limit(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, limits={"max_recipients": 2}))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        assert c.cmd("RCPT TO:<a@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.test>")[0] == 250
        code, text = c.cmd("RCPT TO:<c@example.test>")
        assert code == 452 and "4.5.3" in text
        code, text = c.cmd("NOOP " + "x" * 5000)
        assert code == 500 and "5.5.6" in text
        assert c.cmd("NOOP")[0] == 250


def test_idle_timeout_gives_421(backend: Backend, gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory(base_config(backend.url, limits={"command_timeout": 0.5}))
    with RawClient(gw.port()) as c:
        c.reply()
        code, text = c.reply()  # say nothing: the server speaks first, then hangs up
        assert code == 421 and "4.4.2" in text
        assert c.closed()


def test_max_connections_per_listener(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cfg = base_config(backend.url)
    cfg["listeners"][0]["max_connections"] = 2
    gw = gateway_factory(cfg)
    with RawClient(gw.port()) as a, RawClient(gw.port()) as b:
        assert a.reply()[0] == 220 and b.reply()[0] == 220
        with RawClient(gw.port()) as c:
            code, text = c.reply()
            assert code == 421 and "4.7.0" in text
        a.cmd("QUIT")
        assert a.closed()
    gw.wait_log(lambda e: e.get("event") == "disconnect")
    with RawClient(gw.port()) as d:
        assert d.reply()[0] == 220


def _proxy_v2(src: str, sport: int, dst: str = "198.51.100.1", dport: int = 25) -> bytes:
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("version", [1, 2, "mapped"])
def test_proxy_protocol_from_trusted_network(
    version: int | str, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """ "mapped": a load balancer on a dual-stack socket reports an IPv4 client as
    ::ffff:192.0.2.77; the gateway names it 192.0.2.77 everywhere, as the others."""
    # This test is about PROXY; it has no DNS server, so sender-authentication checks are off.
    cfg = base_config(
        backend.url,
        proxy_networks=["127.0.0.0/8"],
        trusted_networks=[],
        policy=str(ROOT / "bench/proxy-policy.yaml"),
    )
    cfg["listeners"][0]["proxy_protocol"] = True
    gw = gateway_factory(cfg)
    header = {
        1: b"PROXY TCP4 192.0.2.77 198.51.100.1 40001 25\r\n",
        2: _proxy_v2("192.0.2.77", 40001),
        "mapped": b"PROXY TCP6 ::FFFF:192.0.2.77 2001:db8::1 40001 25\r\n",
    }[version]
    with RawClient(gw.port()) as c:
        c.send(header)
        assert c.reply()[0] == 220
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<x@example.test>")
        c.cmd("DATA")
        c.send(b"From: a@sender.test\r\n" + MSG + b".\r\n")
        assert c.reply()[0] == 250
    [m] = backend.messages()
    assert m["xclient"]["ADDR"] == "192.0.2.77"
    assert m["xclient"]["PORT"] == "40001"
    assert b"([192.0.2.77])" in m["data"]
    ev = gw.wait_log(lambda e: e.get("event") == "transaction")
    assert ev["client"] == "192.0.2.77"


def test_proxy_listener_without_header_closes(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cfg = base_config(backend.url, proxy_networks=["127.0.0.0/8"])
    cfg["listeners"][0]["proxy_protocol"] = True
    gw = gateway_factory(cfg)
    with RawClient(gw.port()) as c:
        c.send(b"EHLO client.test\r\n")
        # The gateway aborts (RST): EOF or a reset, by timing; never a greeting.
        assert c.closed() and c.buf == b""


def test_proxy_header_on_plain_listener_is_not_honoured(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, proxy_networks=["127.0.0.0/8"]))
    with RawClient(gw.port()) as c:
        c.reply()
        code, _ = c.cmd("PROXY TCP4 192.0.2.77 198.51.100.1 40001 25")
        assert code == 500


def test_sigterm_during_transaction_never_false_250(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    import signal

    be = backend_factory("--data-delay", "0.5")
    gw = gateway_factory(base_config(be.url, drain_timeout=10))
    busy = RawClient(gw.port())
    idle = RawClient(gw.port())
    try:
        busy.reply()
        idle.reply()
        idle.cmd("EHLO idle.test")
        busy.cmd("EHLO busy.test")
        busy.cmd("MAIL FROM:<a@sender.test>")
        busy.cmd("RCPT TO:<x@example.test>")
        gw.signal(signal.SIGTERM)
        gw.wait_log(lambda e: e.get("event") == "draining")
        # The idle session is told at once; the open transaction may finish.
        code, text = idle.reply()
        assert code == 421 and "4.3.2" in text
        assert busy.cmd("DATA")[0] == 354
        busy.send(MSG + b".\r\n")
        code, _ = busy.reply()
        delivered = len(be.messages())
        if code == 250:
            assert delivered == 1
        else:
            assert 400 <= code < 500 and delivered == 0
        # After its transaction the draining session is closed with 421.
        code, text = busy.cmd("MAIL FROM:<a@sender.test>")
        assert code in (421, 0)
    finally:
        busy.close()
        idle.close()
    assert gw.proc.wait(20) == 0
    # New connections are no longer accepted.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", gw.port()), timeout=2):
        pass


def test_drain_timeout_closes_stuck_transaction_with_421(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    import signal

    gw = gateway_factory(base_config(backend.url, drain_timeout=2))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<x@example.test>")
        start = time.monotonic()
        gw.signal(signal.SIGTERM)
        gw.wait_log(lambda e: e.get("event") == "draining")
        # While draining, the orchestrator is told to send no new traffic.
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(gw.metrics_url + "/healthz/ready")
        assert ei.value.code == 503 and b'"draining": true' in ei.value.read()
        ei.value.close()
        code, text = c.reply()
        assert code == 421 and "4.3.2" in text
        assert time.monotonic() - start < 8
    assert gw.proc.wait(20) == 0
    assert backend.messages() == []


def test_metrics_and_health_endpoints(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    import urllib.request

    gw = gateway_factory(base_config(backend.url))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        s.rcpt("x@remote.test")
        s.rcpt("x@example.test")
        s.data(MSG)
    with urllib.request.urlopen(gw.metrics_url + "/metrics") as r:
        text = r.read().decode()
    assert 'smtp_gateway_transactions_total{outcome="delivered",reason="backend"} 1.0' in text
    assert 'smtp_gateway_recipients_total{outcome="rejected",reason="relay.denied"} 1.0' in text
    assert 'smtp_gateway_connections_total{listener="smtp",result="accepted"} 1.0' in text
    assert "smtp_gateway_backend_reply_seconds_bucket" in text
    assert "smtp_gateway_message_size_bytes_count 1.0" in text
    assert "x@remote.test" not in text and "127.0.0.1" not in text
    with urllib.request.urlopen(gw.metrics_url + "/healthz/live") as r:
        assert r.status == 200
    with urllib.request.urlopen(gw.metrics_url + "/healthz/ready") as r:
        assert r.status == 200


def test_ready_while_every_backend_is_unavailable(gateway_factory: Callable[..., Gateway]) -> None:
    """An MX stays in its load balancer while the backend is down, so that every
    client gets 451 and retries here; the body says the backend is down."""
    import json
    import urllib.request

    dead = f"smtp://127.0.0.1:{free_port()}"
    cfg = base_config(
        dead, backend={"url": dead, "circuit_breaker": {"failures": 1, "cooldown": 60}}
    )
    gw = gateway_factory(cfg)
    with urllib.request.urlopen(gw.metrics_url + "/healthz/ready") as r:
        assert r.status == 200
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("c.test")
        assert s.mail("a@sender.test")[0] == 250  # MAIL waits for the first RCPT
        assert s.rcpt("x@example.test")[0] == 451  # which finds the backend down
    with urllib.request.urlopen(gw.metrics_url + "/healthz/ready") as r:
        assert r.status == 200
        body = json.loads(r.read())
    assert body["ready"] is True and body["backend_available"] is False
    assert body["dns"]["failing"] is False
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:  # and the next client gets 451 too
        s.ehlo("c.test")
        code, msg = s.mail("a@sender.test")  # at MAIL now: the breaker is open
        assert (code, msg[:5]) == (451, b"4.4.1")
