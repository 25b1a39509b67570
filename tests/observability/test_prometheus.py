"""A real Prometheus scrapes a running gateway through a mix of mail; every dashboard
panel's query must return data (a panel that shows nothing fails the test)."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.observability.test_dashboard import panel_queries
from tests.support.certs import make_cert
from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway, base_config
from tests.support.prometheus import Prometheus
from tests.support.redisserver import RedisServer

ZONE = {
    "src.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "_dmarc.src.test": [("TXT", "v=DMARC1; p=none")],
    "2.0.0.127.bl.test": [("A", "127.0.0.2"), ("TXT", "test entry")],
}
POLICY = """
actions:
  ratelimit.exceeded: tempfail
checks:
  dnsbl:
    zones: [{name: testbl, zone: bl.test}]
  ratelimit:
    limits: [{name: per_sender, key: mail_from, unit: messages, rate: 1/hour}]
rewrite:
  virtual_alias:
    rules:
      team@example.test: [alice@example.test, bob@example.test]
      loop1@example.test: loop2@example.test
      loop2@example.test: loop1@example.test
"""


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def make(targets: list[str]) -> Prometheus:
        p = Prometheus(tmp_path / "prometheus", targets)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def traffic(port: int) -> None:
    msg = b"From: a@src.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
    # Delivered, over TLS, with an alias fan-out.
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.starttls(context=no_verify())
        s.ehlo("client.src.test")
        assert s.sendmail("a@src.test", ["team@example.test"], msg) == {}
    # Delivered in plaintext; a relay attempt and an alias loop refused at RCPT.
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.src.test")
        s.mail("b@src.test")
        assert s.rcpt("x@elsewhere.test")[0] == 550
        assert s.rcpt("loop1@example.test")[0] == 550
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(msg)[0] == 250
        # Rejected: a NUL in the message.
        s.mail("c@src.test")
        s.rcpt("alice@example.test")
        assert s.data(b"Subject: x\r\n\r\nnul\x00here\r\n")[0] == 550
        # Deferred: the per-sender limit (1/hour) on the second message.
        assert s.mail("c@src.test")[0] == 450
        assert s.docmd("FOO")[0] == 500  # a protocol error
    # A failed TLS handshake.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO c.test\r\n")  # not pipelined with STARTTLS: a sync error
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        raw.sendall(b"this is not a TLS ClientHello\r\n" * 10)
        raw.recv(100)


def test_every_panel_returns_data_from_a_real_prometheus(
    tmp_path: Path,
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
    redis_server: RedisServer,
    prometheus: Callable[[list[str]], Prometheus],
) -> None:
    dns = DnsServer(ZONE)
    try:
        cert, key = make_cert(tmp_path / "certs")
        cfg = base_config(
            backend.url,
            trusted_networks=[],
            dns={"nameservers": [dns.address]},
            store={"redis_url": redis_server.url},
        )
        cfg["listeners"][0].update(tls="starttls", cert_file=str(cert), key_file=str(key))
        gw = gateway_factory(cfg, policy=POLICY)
        prom = prometheus([gw.cfg["metrics"]["listen"]])
        traffic(gw.port())
        gw.signal(signal.SIGHUP)
        gw.wait_log(lambda e: e.get("event") == "reloaded")
        gw.wait_log(lambda e: e.get("event") == "tls_failed")
        # A rate needs two scrapes of a series: poll until every panel has data, or
        # give up after 30 s of one-second scrapes.
        queries = [
            (title, expr.replace("$job", "smtp-gateway").replace("$instance", ".*"))
            for title, expr in panel_queries()
        ]
        queries = [(t, q.replace("$__rate_interval", "1m")) for t, q in queries]
        deadline = time.monotonic() + 30
        while True:
            empty = [f"{t}: {q}" for t, q in queries if not prom.query(q)]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert empty == [], "panels with no data:\n" + "\n".join(empty)
        outcomes = {
            r["metric"]["outcome"]
            for r in prom.query('smtp_gateway_transactions_total{job="smtp-gateway"}')
        }
        assert {"delivered", "rejected", "tempfailed"} <= outcomes
    finally:
        dns.close()
