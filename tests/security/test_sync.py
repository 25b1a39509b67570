"""SMTP synchronisation (RFC 5321 4.3, RFC 2920 3.1): an untrusted client that sends
before our greeting, or past a command it must wait on, gets 554 5.5.0 and is cut off
before anything it sent reaches the backend. Pipelining within the rules still works,
and trusted networks (or `limits.enforce_sync: false`) are left alone."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.procs import ROOT, Backend, Gateway, base_config
from tests.support.smtp import RawClient

MSG = b"Subject: sync\r\n\r\nbody\r\n"
SYNC = "554 5.5.0 SMTP synchronization error: input before our reply"


def untrusted(backend: Backend, **limits: Any) -> dict[str, Any]:
    """An untrusted client (loopback out of trusted_networks) with no checks: no DNS."""
    policy = str(ROOT / "bench/proxy-policy.yaml")
    return base_config(backend.url, trusted_networks=[], limits=limits, policy=policy)


def test_a_helo_client_that_pipelines_is_cut_before_the_backend_sees_it(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """HELO offers no PIPELINING: every command must wait for its reply."""
    gw = gateway_factory(untrusted(backend))
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        assert c.cmd("HELO client.test")[0] == 250
        c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.test>\r\n")
        assert c.reply() == (554, SYNC)
        assert c.closed()
    assert not any(line.startswith("MAIL") for line in backend.commands())
    ev = gw.wait_log(lambda e: e.get("event") == "sync_error")
    assert ev["after"] == "MAIL" and ev["pending"] == len(b"RCPT TO:<x@example.test>\r\n")
    assert gw.metric('smtp_gateway_command_errors_total{reason="sync_error"}') == 1


@pytest.mark.parametrize(
    "group",
    [
        b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\n",  # EHLO ends a group
        b"DATA\r\n" + MSG + b".\r\n",  # the message sent before our 354
        b"NOOP\r\nRCPT TO:<y@example.test>\r\n",
    ],
    ids=["after-ehlo", "message-before-354", "after-noop"],
)
def test_a_command_after_one_that_ends_a_group_is_cut(
    group: bytes, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(untrusted(backend))
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        c.send(group)
        assert c.reply() == (554, SYNC)
        assert c.closed()
    assert backend.messages() == []
    # The backend transaction opened at MAIL was undone, not left hanging.
    gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("outcome") == "aborted")


def test_pipelining_within_the_rules_is_served(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """RFC 2920: after EHLO, MAIL/RCPT/DATA in one group; the message content first in
    the next group, followed by the next transaction; QUIT after the final dot."""
    gw = gateway_factory(untrusted(backend))
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        envelope = b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.test>\r\n"
        c.send(envelope + b"RCPT TO:<y@example.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(MSG + b".\r\n" + envelope + b"DATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(MSG + b".\r\nQUIT\r\n")
        assert [c.reply()[0] for _ in range(2)] == [250, 221]
    assert [m["rcpt_tos"] for m in backend.messages()] == [
        ["x@example.test", "y@example.test"],
        ["x@example.test"],
    ]


def test_a_client_that_talks_before_the_greeting_is_refused(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """With `greet_pause` the gateway waits before its 220, watching for bots that do
    not; a client that waits gets its greeting after the pause, never before."""
    gw = gateway_factory(untrusted(backend, greet_pause=1.5))
    with RawClient(gw.port()) as c:
        c.send(b"EHLO hasty.test\r\n")
        assert c.reply() == (554, "554 5.5.0 SMTP synchronization error: input before the greeting")
        assert c.closed()
    ev = gw.wait_log(lambda e: e.get("event") == "sync_error")
    assert ev["after"] == "connect"
    start = time.monotonic()
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        assert time.monotonic() - start >= 1.5
        assert c.cmd("EHLO patient.test")[0] == 250


@pytest.mark.parametrize("how", ["trusted", "disabled"])
def test_trusted_clients_and_enforce_sync_off_may_pipeline_anything(
    how: str, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    if how == "trusted":
        cfg = base_config(backend.url, limits={"greet_pause": 5})  # loopback is trusted
    else:
        cfg = untrusted(backend, enforce_sync=False)
    gw = gateway_factory(cfg)
    start = time.monotonic()
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        assert time.monotonic() - start < 4  # trusted clients skip the 5 s pause
        c.send(b"HELO script.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.test>\r\n")
        c.send(b"DATA\r\n" + MSG + b".\r\nQUIT\r\n")
        assert [c.reply()[0] for _ in range(6)] == [250, 250, 250, 354, 250, 221]
    assert len(backend.messages()) == 1
