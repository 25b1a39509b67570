"""One accounting of what the policy refused, at every stage, and of connections
refused at connect; TLS handshake failures named by what really happened."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

from prometheus_client import REGISTRY

from gateway import config, metrics
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.dns import Resolver
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.runner import Runner
from gateway.smtp import tls
from gateway.smtp.local import AcceptingBackend, LocalSession, plain_listener, services
from gateway.store.memory import MemoryStore
from tests.support.certs import make_cert


def sample(name: str, **labels: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_refusals_are_counted_at_connect_and_at_rcpt(tmp_path: Path) -> None:
    """A client past its concurrency slot is refused at connect (421): counted as a
    refused connection and a refusal at connect, not as an accepted connection;
    a relay attempt is a refusal at RCPT."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "checks:\n"
        + "".join(f"  {c}: {{enabled: false}}\n" for c in ("spf", "dkim", "dmarc", "arc", "dnsbl"))
        + "  ratelimit:\n    concurrency:\n      - {name: one, key: client_ip, max: 1}\n"
        + "actions: {ratelimit.concurrency: tempfail}\n"
    )
    settings = config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
            "policy": str(policy),
            "listeners": [{"name": "acct", "port": 2525}],
            "dns": {"nameservers": ["127.0.0.1:9"]},
        }
    )
    conn = "smtp_gateway_connections_total"
    refusals = "smtp_gateway_refusals_total"
    before = {
        "accepted": sample(conn, listener="acct", result="accepted"),
        "refused": sample(conn, listener="acct", result="refused_policy"),
        "connect": sample(
            refusals, stage="connect", action="tempfail", reason="ratelimit.concurrency"
        ),
        "rcpt": sample(refusals, stage="rcpt", action="reject", reason="relay.denied"),
    }

    async def go() -> tuple[list[str], list[str]]:
        pol = policy_mod.load(settings.policy, all_known_symbols())
        runner = Runner(build_checks(settings, Resolver(settings.dns), MemoryStore()), pol)
        svc = services(settings, runner, AcceptingBackend())
        first = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4000))
        second = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4001))
        try:
            await first.start()
            greeting = await second.start()
            await first.send("EHLO c.test")
            await first.send("MAIL FROM:<a@sender.test>")
            rcpt = await first.send("RCPT TO:<x@elsewhere.test>")
            return greeting, rcpt
        finally:
            await first.close()
            await second.close()

    greeting, rcpt = asyncio.run(go())
    assert greeting[0].startswith("421 4.7.0") and rcpt[0].startswith("550")
    assert sample(conn, listener="acct", result="accepted") == before["accepted"] + 1
    assert sample(conn, listener="acct", result="refused_policy") == before["refused"] + 1
    assert (
        sample(refusals, stage="connect", action="tempfail", reason="ratelimit.concurrency")
        == before["connect"] + 1
    )
    assert (
        sample(refusals, stage="rcpt", action="reject", reason="relay.denied") == before["rcpt"] + 1
    )


def _handshake_failure(tmp_path: Path, first_bytes: bytes, minimum: str = "TLSv1.2") -> str:
    """What a server-side OpenSSL handshake makes of a client's first bytes, named
    as the metric names it (memory BIOs: no socket)."""
    cert, key = make_cert(tmp_path, "gw.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.VERSIONS[minimum]
    ctx.load_cert_chain(cert, key)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(first_bytes)
    try:
        obj.do_handshake()
    except ssl.SSLError as e:
        return tls.failure_reason(e)
    raise AssertionError("the handshake did not fail")


def test_plaintext_on_an_implicit_tls_port_is_not_tls(tmp_path: Path) -> None:
    assert _handshake_failure(tmp_path, b"EHLO client.example\r\n") == "not_tls"
    assert _handshake_failure(tmp_path, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == "not_tls"


def test_an_old_protocol_version_is_protocol_version(tmp_path: Path) -> None:
    """A TLS 1.2 ClientHello at a listener whose minimum is TLS 1.3."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(cin, cout)
    with contextlib.suppress(ssl.SSLWantReadError):
        c.do_handshake()
    assert _handshake_failure(tmp_path, cout.read(), "TLSv1.3") == "protocol_version"
