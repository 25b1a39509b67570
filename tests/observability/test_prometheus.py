"""A real Prometheus scrapes a running two-worker gateway through a mix of mail; every
dashboard panel's query must return data (a panel that shows nothing fails the test),
every alert rule's expression must evaluate on the real series, and what Prometheus
reads must be right: refusals at connect, a renewed certificate's expiry, and the
virus scans of a real clamd (a verdict, a kept connection, an error once it stops).

Content scanning runs against clamd only: every panel of its row aggregates over the
scanners, so clamd's series fill them all (the error kinds are exported at zero from
the start, and clamd stopped mid-test gives a real `unavailable`). Rspamd's own series
are proved by its integration tests; its first start here (compiling its regex cache)
would cost about a minute for no panel that clamd leaves empty."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.integration.test_tls import _swap
from tests.integration.test_workers import _ready_pids
from tests.observability.test_dashboard import alert_rules, panel_queries
from tests.support.certs import make_cert
from tests.support.clamd import MARKER, SIGNATURES, Clamd
from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway, base_config
from tests.support.prometheus import Prometheus
from tests.support.redisserver import RedisServer

ZONE = {
    "src.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "_dmarc.src.test": [("TXT", "v=DMARC1; p=none")],
    "2.0.0.127.bl.test": [("A", "127.0.0.2"), ("TXT", "test entry")],
}
# 127.0.0.2 is the zone's RFC 5782 test entry: a client connecting from it is listed
# (554 at connect). 127.0.0.1, the rest of the traffic, is exempt from the concurrency
# limit; 127.0.0.3 may hold one session at a time (421 at connect for a second one).
POLICY = """
actions:
  dnsbl.listed: reject
  ratelimit.exceeded: tempfail
  ratelimit.concurrency: tempfail
  virus.found: reject
  clamav.unavailable: tempfail
checks:
  clamav: {enabled: true, endpoint: "@CLAMD@"}
  # Greylisting on, the test's own senders (SPF pass for src.test) exempt: its
  # panel has data and no message of the traffic below is deferred by it.
  greylist: {enabled: true, exempt_domains: [src.test]}
  dnsbl:
    zones: [{name: testbl, zone: bl.test}]
  ratelimit:
    limits: [{name: per_sender, key: mail_from, unit: messages, rate: 1/hour}]
    concurrency: [{name: one_at_a_time, max: 1, exempt_networks: [127.0.0.1/32]}]
rewrite:
  virtual_alias:
    rules:
      team@example.test: [alice@example.test, bob@example.test]
      loop1@example.test: loop2@example.test
      loop2@example.test: loop1@example.test
"""


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """A real clamd with the test's own signatures (the test stops it part-way)."""
    server = Clamd(tmp_path_factory.mktemp("clamd"))
    yield server
    server.stop()


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


def refused_at_connect(port: int) -> None:
    """Two sessions the policy refuses before the greeting: a listed client (reject)
    and one over its concurrency limit (tempfail)."""
    with pytest.raises(smtplib.SMTPConnectError) as listed:
        smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=10)
    assert listed.value.smtp_code == 554
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.3", 0), timeout=10) as held:
        held.ehlo("client.src.test")
        with pytest.raises(smtplib.SMTPConnectError) as second:
            smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.3", 0), timeout=10)
        assert second.value.smtp_code == 421
        assert held.noop()[0] == 250  # the first one is untouched


SCANNED = b"From: d@src.test\r\nTo: alice@example.test\r\nSubject: scan\r\n\r\n"


def scanned(port: int, clamd: Clamd) -> None:
    """In one session (so one worker, one kept clamd connection): a clean message
    delivered and an infected one refused, both scanned by clamd, the first scans it
    made."""
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.src.test")
        assert s.sendmail("d@src.test", ["alice@example.test"], SCANNED + b"clean\r\n") == {}
        s.mail("e@src.test")
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(SCANNED + b"attached: " + MARKER + b"\r\n")[0] == 554
    assert clamd.wait_results(2) == ["OK", f"{SIGNATURES['marker']} FOUND"]


def scanner_down(port: int, clamd: Clamd) -> None:
    """clamd stops (and has logged every scan it made); the next message is deferred
    (clamav.unavailable: tempfail)."""
    clamd.stop()
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.src.test")
        s.mail("f@src.test")
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(SCANNED + b"unscanned\r\n")[0] == 451


def poll(prom: Prometheus, expr: str, done: Callable[[list[dict[str, Any]]], bool]) -> Any:
    """The query's result once `done` says so, or the last one after 20 s (a worker
    writes its figures within a second, Prometheus scrapes every second)."""
    deadline = time.monotonic() + 20
    while True:
        result = prom.query(expr)
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def not_after(cert: Path) -> float:
    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()


def by_pid(gw: Gateway, event: str) -> set[int]:
    return {e["pid"] for e in gw.events() if e.get("event") == event}


def test_every_panel_returns_data_from_a_real_prometheus(
    tmp_path: Path,
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
    redis_server: RedisServer,
    prometheus: Callable[[list[str]], Prometheus],
    clamd: Clamd,
) -> None:
    dns = DnsServer(ZONE)
    try:
        # The certificate as a Kubernetes Secret mounts it: tls.crt -> ..data/..., so a
        # renewal is one rename. Ten days left, then a renewal to ninety.
        vol = tmp_path / "secret"
        c1, k1 = make_cert(vol / "v1", "gw.test", days=10)
        for name, src in (("tls.crt", c1.name), ("tls.key", k1.name)):
            (vol / name).symlink_to(f"..data/{src}")
        _swap(vol, vol / "v1")
        cfg = base_config(
            backend.url,
            workers=2,
            tls_reload_interval=0.2,
            trusted_networks=[],
            dns={"nameservers": [dns.address]},
            store={"redis_url": redis_server.url},
        )
        cfg["listeners"][0].update(
            tls="starttls", cert_file=str(vol / "tls.crt"), key_file=str(vol / "tls.key")
        )
        gw = gateway_factory(cfg, policy=POLICY.replace("@CLAMD@", clamd.tcp), ready=False)
        workers = _ready_pids(gw, 2)
        assert len(workers) == 2
        prom = prometheus([gw.cfg["metrics"]["listen"]])
        expiry = 'min(smtp_gateway_tls_certificate_expiry_timestamp_seconds{job="smtp-gateway"})'
        old = not_after(c1)
        assert values(poll(prom, expiry, lambda r: values(r) == [old])) == [old]

        scanned(gw.port(), clamd)
        traffic(gw.port())
        refused_at_connect(gw.port())
        scanner_down(gw.port(), clamd)
        gw.signal(signal.SIGHUP)  # the master passes it on to each worker
        gw.wait_log(lambda e: len(by_pid(gw, "reloaded")) >= 2)
        gw.wait_log(lambda e: e.get("event") == "tls_failed")
        # The renewal, picked up by both workers.
        c2, _ = make_cert(vol / "v2", "gw.test", days=90)
        new = not_after(c2)
        _swap(vol, vol / "v2")
        gw.wait_log(lambda e: by_pid(gw, "tls_reloaded") >= workers)

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

        # (a) The refusals at connect, as Prometheus reads them from the two workers.
        want = {("reject", "dnsbl.listed"): 1.0, ("tempfail", "ratelimit.concurrency"): 1.0}
        refusals = 'sum by (action, reason) (smtp_gateway_refusals_total{stage="connect"})'

        def at_connect(r: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
            return {(x["metric"]["action"], x["metric"]["reason"]): float(x["value"][1]) for x in r}

        assert at_connect(poll(prom, refusals, lambda r: at_connect(r) == want)) == want
        results = 'sum by (result) (smtp_gateway_connections_total{job="smtp-gateway"})'

        def connections(r: list[dict[str, Any]]) -> dict[str, float]:
            return {x["metric"]["result"]: float(x["value"][1]) for x in r}

        # Accepted: the three sessions of traffic(), the one held from 127.0.0.3, those of
        # scanned() and scanner_down(); the two refused at connect never got a 220.
        seen = connections(poll(prom, results, lambda r: connections(r).get("accepted") == 6))
        assert seen["refused_policy"] == 2 and seen["accepted"] == 6, seen
        hits = 'sum(smtp_gateway_ratelimit_hits_total{limit="one_at_a_time"})'
        assert values(prom.query(hits)) == [1.0]

        # (b) The renewed certificate's notAfter, whichever worker answers the scrape: the
        # least over the series is the new one, and stays so scrape after scrape.
        assert values(poll(prom, expiry, lambda r: values(r) == [new])) == [new]
        time.sleep(4)
        window = "smtp_gateway_tls_certificate_expiry_timestamp_seconds[3s]"
        assert values(prom.query(f"min(min_over_time({window}))")) == [new]
        assert values(prom.query(f"max(max_over_time({window}))")) == [new]
        assert new > old  # so the least over old and new series would be the old one

        # (c) The scans as Prometheus reads them: one per scan clamd logged (its log is
        # complete: it has stopped), and the one refused after it stopped; one virus;
        # one error, `unavailable`; the second message of scanned() over the connection
        # the first one left open.
        want_scans = len(clamd.results()) + 1.0
        scans = 'sum(smtp_gateway_scan_seconds_count{scanner="clamav"})'
        assert values(poll(prom, scans, lambda r: values(r) == [want_scans])) == [want_scans]
        virus = 'sum(smtp_gateway_check_results_total{check="clamav",symbol="virus.found"})'
        assert values(prom.query(virus)) == [1.0]
        kinds = 'sum by (kind) (smtp_gateway_scanner_errors_total{scanner="clamav"})'
        errors = {r["metric"]["kind"]: float(r["value"][1]) for r in prom.query(kinds)}
        assert errors == {"unavailable": 1.0, "timeout": 0.0, "protocol": 0.0}
        reused = 'sum(smtp_gateway_scanner_connections_total{scanner="clamav",result="reused"})'
        assert values(prom.query(reused))[0] >= 1

        # Every alert rule evaluates on the real series (no matching error), and the
        # SmtpGatewayDown join finds the gateway's target by its `up`.
        for rule in alert_rules():
            prom.query(rule["expr"])
        joined = prom.query(
            "up == 1 and on (namespace, job, instance) max_over_time(smtp_gateway_build_info[1h])"
        )
        assert [r["metric"]["instance"] for r in joined] == [gw.cfg["metrics"]["listen"]]
    finally:
        dns.close()
