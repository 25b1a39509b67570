"""Rate and concurrency limits through real SMTP sessions."""

from __future__ import annotations

import smtplib
from collections.abc import Callable

from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient

MSG = b"From: a@sender.test\r\nSubject: r\r\n\r\nhi\r\n"
OFF = (
    "checks:\n  spf: {enabled: false}\n  dkim: {enabled: false}\n  arc: {enabled: false}\n"
    "  dmarc: {enabled: false}\n"
)


def limited(backend: Backend, gateway_factory: Callable[..., Gateway], limits: str) -> Gateway:
    pol = (
        "actions:\n  ratelimit.exceeded: tempfail\n  ratelimit.concurrency: tempfail\n"
        + OFF
        + "  ratelimit:\n"
        + limits
    )
    return gateway_factory(base_config(backend.url, trusted_networks=[]), policy=pol)


def ratelimit_cli(gw: Gateway, *args: str) -> str:
    return gw.command("ratelimit", *args)


def send(port: int, rcpts: tuple[str, ...] = ("x@example.test",)) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.test")
        code, msg = s.mail("a@sender.test")
        if code != 250:
            return code, msg
        for r in rcpts:
            code, msg = s.rcpt(r)
            if code != 250:
                return code, msg
        return s.data(MSG)


def test_message_limit_refuses_the_n_plus_first_and_shows_the_count(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """A window far longer than the test, so nothing drains while it runs. That the
    count drains on time is the store's, on a controlled clock:
    tests/unit/smtp/test_envelope.py (test_message_limit_recovers_after_one_cell_of_its_window)."""
    gw = limited(
        backend,
        gateway_factory,
        "    limits:\n      - {name: msgs, key: client_ip, unit: messages, rate: 3/hour}\n",
    )
    assert [send(gw.port())[0] for _ in range(3)] == [250, 250, 250]
    # The reply of replies.py for ratelimit.exceeded under tempfail, at MAIL.
    assert send(gw.port()) == (450, b"4.7.1 Rate limit exceeded, try again later")
    assert len(backend.messages()) == 3
    # Operators see the in-memory count through the gateway's loopback endpoint: the
    # three accepted, not the refused one (a refusal charges nothing).
    shown = ratelimit_cli(gw, "show", "msgs:127.0.0.1")
    head = "msgs:127.0.0.1: 3.0 of 3 messages used (3/hour, burst 0), 0.0 left, fully drained in "
    assert shown.startswith(head) and shown.endswith("s\n"), shown
    assert 3500 < float(shown[len(head) : -2]) <= 3600, shown


def test_recipient_limit_per_sender(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = limited(
        backend,
        gateway_factory,
        "    limits:\n      - {name: rcpts, key: mail_from, unit: recipients, rate: 3/hour}\n",
    )
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        codes = [s.rcpt(f"u{i}@example.test")[0] for i in range(4)]
        assert codes == [250, 250, 250, 450]
        assert s.data(MSG)[0] == 250  # the three accepted recipients get the message
    [m] = backend.messages()
    assert len(m["rcpt_tos"]) == 3


def test_concurrency_limit_refuses_extra_connection_and_frees_the_slot(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = limited(
        backend,
        gateway_factory,
        "    concurrency:\n      - {name: conns, key: client_ip, max: 2}\n",
    )
    a, b = RawClient(gw.port()), RawClient(gw.port())
    try:
        assert a.reply()[0] == 220 and b.reply()[0] == 220
        with RawClient(gw.port()) as c:
            code, text = c.reply()
            assert code == 421 and "4.7.0" in text
        gw.wait_log(lambda e: e.get("event") == "disconnect")
        a.cmd("QUIT")
        assert a.closed()
        gw.wait_log(lambda e: sum(1 for x in gw.events() if x.get("event") == "disconnect") >= 2)
        with RawClient(gw.port()) as d:
            assert d.reply()[0] == 220
    finally:
        a.close()
        b.close()


def test_operator_reset_lifts_an_in_memory_limit(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = limited(
        backend,
        gateway_factory,
        "    limits:\n      - {name: msgs, key: client_ip, unit: messages, rate: 1/hour}\n",
    )
    assert send(gw.port())[0] == 250
    assert send(gw.port())[0] == 450
    assert "msgs:127.0.0.1" in ratelimit_cli(gw, "show", "msgs")
    assert "1 key(s) removed" in ratelimit_cli(gw, "reset", "msgs:127.0.0.1")
    assert "nothing counted" in ratelimit_cli(gw, "show", "msgs:127.0.0.1")
    assert send(gw.port())[0] == 250


def test_workers_count_one_limit_together(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """With two workers (SO_REUSEPORT spreads the connections over both) a client
    gets its limit once, not once per worker, and either worker shows the count."""
    pol = (
        "actions:\n  ratelimit.exceeded: tempfail\n"
        + OFF
        + "  ratelimit:\n    limits:\n"
        + "      - {name: msgs, key: client_ip, unit: messages, rate: 20/hour}\n"
    )
    cfg = base_config(backend.url, trusted_networks=[], workers=2)
    gw = gateway_factory(cfg, policy=pol, ready=False)
    gw.wait_log(
        lambda e: len({x["pid"] for x in gw.events() if x.get("event") == "ready"}) >= 2,
        timeout=20,
    )
    codes = [send(gw.port())[0] for _ in range(30)]
    assert codes.count(250) == 20 and codes.count(450) == 10, codes
    served = {e["pid"] for e in gw.events() if e.get("event") == "disconnect"}
    assert len(served) == 2  # both workers took sessions, and counted in one table
    assert len(backend.messages()) == 20
    for _ in range(4):  # whichever worker answers the operator sees the same count
        assert "20.0 of 20 messages used" in ratelimit_cli(gw, "show", "msgs:127.0.0.1")
