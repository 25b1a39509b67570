"""A backend has a connection limit; a peak must not turn it into an outage.

A before-queue gateway opens a backend session per client transaction, so at a
peak it can ask for more than the backend accepts. These run the recording
backend with --max-connections (a 421 greeting beyond, as Exim and Exchange
answer at their limits) behind real SMTP sessions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tests.security.helpers import greeted
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient, deliver

MSG = b"Subject: limits\r\n\r\nhello\r\n"


def _open_transaction(port: int) -> tuple[RawClient, int, str]:
    c = greeted(port, timeout=30)
    assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
    code, text = c.cmd("RCPT TO:<x@example.test>")
    return c, code, text


def _finish(c: RawClient) -> tuple[int, str]:
    assert c.cmd("DATA")[0] == 354
    c.send(MSG + b".\r\n")
    reply = c.reply()
    c.cmd("QUIT")
    c.sock.close()
    return reply


def _max_open_at_backend(backend: Backend) -> int:
    return max(int(line.split()[3]) for line in backend.commands() if line.startswith("CONNECT"))


def _wait_metric(gw: Gateway, sample: str, want: float) -> None:
    deadline = time.monotonic() + 10
    while gw.metric(sample) != want:
        assert time.monotonic() < deadline, f"{sample} never reached {want}"
        time.sleep(0.05)


def test_a_backend_at_its_connection_limit_does_not_trip_the_breaker(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """Transactions over the backend's limit get 451 4.4.5 and are retried; the
    circuit breaker stays closed, so the sessions the backend does serve, and every
    transaction after the peak, go through. (Counting a busy greeting as a failure
    opened the breaker after five, and then every client got 451 for its cooldown.)"""
    backend = backend_factory("--max-connections", "2")
    # No spares: each connect here is a transaction's own, so the count below is exact.
    gw = gateway_factory(base_config(backend.url, backend={"max_sessions": None, "pool_size": 0}))
    held = []
    refused = []
    for _ in range(8):  # 2 the backend takes, then 6: more than the breaker's 5
        c, code, text = _open_transaction(gw.port())
        (held if code == 250 else refused).append((c, text))
    assert len(held) == 2
    assert all(t.startswith("451 4.4.5") for _, t in refused), refused
    for c, _ in refused:
        c.sock.close()
    for c, _ in held:
        assert _finish(c)[0] == 250
    assert deliver(gw.port(), MSG)[0] == 250  # right after the peak
    assert len(backend.messages()) == 3
    assert gw.metric("smtp_gateway_backend_circuit_open") == 0
    assert gw.metric('smtp_gateway_backend_connects_total{result="busy"}') == 6
    # One log line for the six, not one each: at a peak that would be every transaction.
    busy_lines = [e for e in gw.events() if "busy" in str(e.get("msg", e.get("raw", "")))]
    assert len(busy_lines) == 1, busy_lines


def test_transactions_beyond_max_sessions_wait_for_a_session_to_come_free(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """With backend.max_sessions at the backend's limit, the second transaction
    waits for the first one's session instead of being refused, and the backend
    never sees more sessions than its limit."""
    backend = backend_factory("--max-connections", "1")
    gw = gateway_factory(base_config(backend.url, backend={"max_sessions": 1}))
    first, code, _ = _open_transaction(gw.port())
    assert code == 250
    second: dict[str, object] = {}

    def run_second() -> None:
        c, code, text = _open_transaction(gw.port())
        second["rcpt"] = (code, text)
        second["end"] = _finish(c) if code == 250 else None

    t = threading.Thread(target=run_second)
    t.start()
    _wait_metric(gw, 'smtp_gateway_backend_session_waiters{target="0"}', 1)
    assert _finish(first)[0] == 250
    t.join(30)
    assert isinstance(second["rcpt"], tuple) and second["rcpt"][0] == 250, second
    assert isinstance(second["end"], tuple) and second["end"][0] == 250
    assert len(backend.messages()) == 2
    assert _max_open_at_backend(backend) == 1
    assert "BUSY" not in backend.commands()
    assert gw.metric('smtp_gateway_backend_session_waits_total{result="ok",target="0"}') == 1


def test_a_transaction_that_waits_too_long_gets_451_4_4_5_and_nothing_else_suffers(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    backend = backend_factory()
    cfg = base_config(backend.url, backend={"max_sessions": 1, "connect_timeout": 1})
    gw = gateway_factory(cfg)
    first, code, _ = _open_transaction(gw.port())
    assert code == 250
    start = time.monotonic()
    second, code, text = _open_transaction(gw.port())
    assert code == 451 and text.startswith("451 4.4.5"), text
    assert 0.9 < time.monotonic() - start < 5  # the wait is the connect timeout
    assert second.cmd("RSET")[0] == 250
    assert _finish(first)[0] == 250
    # The session is free again: the same client's retry goes through.
    assert second.cmd("MAIL FROM:<a@sender.test>")[0] == 250
    assert second.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert _finish(second)[0] == 250
    assert len(backend.messages()) == 2
    waits = "smtp_gateway_backend_session_waits_total"
    assert gw.metric(f'{waits}{{result="timeout",target="0"}}') == 1
    assert gw.metric("smtp_gateway_backend_circuit_open") == 0


def test_a_backend_that_accepts_and_never_greets_is_unavailable_after_connect_timeout(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """Postfix throttling its smtpd accepts connections and says nothing: the
    greeting is waited for up to connect_timeout (1 s here), not command_timeout."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)  # never a byte

    threading.Thread(target=accept, daemon=True).start()
    url = f"smtp://127.0.0.1:{listener.getsockname()[1]}"
    cfg = base_config(url, backend={"connect_timeout": 1, "command_timeout": 30, "pool_size": 0})
    gw = gateway_factory(cfg)
    try:
        start = time.monotonic()
        with RawClient(gw.port(), timeout=40) as c:
            assert c.reply()[0] == 220
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<a@sender.test>")
            code, text = c.cmd("RCPT TO:<x@example.test>")
        assert code == 451 and text.startswith("451 4.4."), text
        assert time.monotonic() - start < 10
    finally:
        listener.close()
        for conn in held:
            conn.close()
