"""workers: N processes share the listeners; metrics add up; one drain; restarts."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import deliver

MSG = b"Subject: w\r\n\r\nhello\r\n"


def _scrape(gw: Gateway) -> str:
    with urllib.request.urlopen(gw.metrics_url + "/metrics") as r:
        return str(r.read().decode())


def _value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _scrape_until(gw: Gateway, prefix: str, want: float, timeout: float = 10) -> str:
    """Scrape until the sample reaches `want`: a worker writes its buffered metrics
    at most metrics.FLUSH_INTERVAL after the update, whichever worker answers."""
    deadline = time.monotonic() + timeout
    while True:
        text = _scrape(gw)
        if _value(text, prefix) == want or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _send(port: int, n: int) -> None:
    for _ in range(n):
        assert deliver(port, MSG, helo="c.test")[0] == 250


def _ready_pids(gw: Gateway, n: int) -> set[int]:
    gw.wait_log(
        lambda e: len({x["pid"] for x in gw.events() if x.get("event") == "ready"}) >= n, timeout=20
    )
    return {x["pid"] for x in gw.events() if x.get("event") == "ready"}


def test_two_workers_share_sessions_metrics_and_drain(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, workers=2), ready=False)
    pids = _ready_pids(gw, 2)
    assert len(pids) == 2 and gw.proc.pid not in pids
    _send(gw.port(), 30)
    served = {
        e["pid"]
        for e in gw.events()
        if e.get("event") == "transaction" and e.get("outcome") == "delivered"
    }
    assert served == pids  # both workers took sessions
    # Whichever worker answers the scrape, the totals are the sum over both (once
    # each worker has flushed: within metrics.FLUSH_INTERVAL).
    delivered = 'smtp_gateway_transactions_total{outcome="delivered"'
    assert _value(_scrape_until(gw, delivered, 30), delivered) == 30
    for _ in range(6):
        text = _scrape(gw)
        assert _value(text, 'smtp_gateway_transactions_total{outcome="delivered"') == 30
        accepted = 'smtp_gateway_connections_total{listener="smtp",result="accepted"'
        assert _value(text, accepted) == 30
    assert len(backend.messages()) == 30
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(30) == 0
    stopped = {e["pid"] for e in gw.events() if e.get("event") == "stopped"}
    assert stopped == pids


def test_crashed_worker_is_restarted_and_counted(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, workers=2), ready=False)
    pids = _ready_pids(gw, 2)
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    ev = gw.wait_log(lambda e: e.get("event") == "worker_died")
    assert ev["pid"] == victim
    new = _ready_pids(gw, 3) - pids
    assert len(new) == 1
    _send(gw.port(), 10)
    text = _scrape_until(gw, 'smtp_gateway_transactions_total{outcome="delivered"', 10)
    assert _value(text, "smtp_gateway_worker_restarts_total") == 1
    assert _value(text, 'smtp_gateway_transactions_total{outcome="delivered"') == 10
    assert len(backend.messages()) == 10


def test_available_cpus_and_default_worker_count() -> None:
    from gateway import workers

    n = workers.available_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_a_second_gateway_on_the_same_port_refuses_to_start(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """SO_REUSEPORT would let it share the port silently; the master probes first."""
    cfg = base_config(backend.url, workers=2)
    first = gateway_factory(cfg, ready=False)
    _ready_pids(first, 2)
    second = gateway_factory(cfg, ready=False)
    assert second.proc.wait(30) == 1
    refusal = second.wait_log(lambda e: "cannot listen on" in e.get("raw", ""))
    assert f"cannot listen on 127.0.0.1:{first.port()}" in refusal["raw"]
    assert "another smtp-gateway" in refusal["raw"]
    _send(first.port(), 3)  # the first one is untouched
    assert len(backend.messages()) == 3


def test_a_renewed_certificate_reads_renewed_with_workers(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """With workers, the expiry gauge is the workers' own: not the master's value
    from validating the config (it never reloads), nor a dead worker's; and it is
    there at the first scrape, not a flush later."""
    from tests.integration.test_tls import _swap, tls_listener
    from tests.support.certs import make_cert

    vol = tmp_path / "secret"
    c1, k1 = make_cert(vol / "v1", "gw.test", days=10)
    for name, src in (("tls.crt", c1.name), ("tls.key", k1.name)):
        (vol / name).symlink_to(f"..data/{src}")
    _swap(vol, vol / "v1")
    cfg = tls_listener(base_config(backend.url, workers=2), vol / "tls.crt", vol / "tls.key")
    cfg["tls_reload_interval"] = 0.2
    gw = gateway_factory(cfg, ready=False)
    pids = _ready_pids(gw, 2)
    expiry = 'smtp_gateway_tls_certificate_expiry_timestamp_seconds{certificate="default"'
    first = x509.load_pem_x509_certificate(c1.read_bytes()).not_valid_after_utc.timestamp()
    assert _value(_scrape(gw), expiry) == first  # at once: written before `ready`
    c2, _ = make_cert(vol / "v2", "gw.test", days=90)
    _swap(vol, vol / "v2")
    gw.wait_log(
        lambda e: len({x["pid"] for x in gw.events() if x.get("event") == "tls_reloaded"}) >= 2
    )
    second = x509.load_pem_x509_certificate(c2.read_bytes()).not_valid_after_utc.timestamp()
    assert _value(_scrape_until(gw, expiry, second), expiry) == second
    # A worker killed and replaced: its file must not hold the value either way.
    os.kill(sorted(pids)[0], signal.SIGKILL)
    _ready_pids(gw, 3)
    for _ in range(4):
        assert _value(_scrape(gw), expiry) == second
