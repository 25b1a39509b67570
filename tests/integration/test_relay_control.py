"""Relay control through real sessions: nothing non-local ever reaches the backend."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient

TRICKS = [
    "<user@remote.test>",
    "<user%remote.test@example.test>",
    '<"user@remote.test"@example.test>',
    "<@example.test:user@remote.test>",
    "<@example.test,@other.test:user@example.test>",
    "<remote.test!user@example.test>",
    "<user@[127.0.0.1]>",
    "<user@example.test.>",
    "<user@corp.test>",  # the wildcard *.corp.test covers subdomains only
    "<user@example.test.remote.test>",
    "<user@xn--exmple-cua.test>",
]


@pytest.mark.parametrize("rcpt", TRICKS)
def test_relay_tricks_get_550_571_and_never_reach_backend(
    rcpt: str, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        code, text = c.cmd(f"RCPT TO:{rcpt}")
        assert code == 550 and text.startswith("550 5.7.1"), text
        assert c.cmd("DATA")[0] == 554  # no valid recipients
        c.cmd("QUIT")
    assert not any(cmd.startswith("RCPT") for cmd in backend.commands())
    assert backend.messages() == []


@pytest.mark.parametrize(
    "rcpt",
    [
        "<user@EXAMPLE.test>",
        "<USER@example.test>",
        '<"quoted user"@example.test>',
        "<user@deep.sub.corp.test>",
    ],
)
def test_local_variants_are_accepted(
    rcpt: str, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        code, text = c.cmd(f"RCPT TO:{rcpt}")
        assert code == 250, text


@pytest.mark.parametrize(
    "line",
    [
        b"RCPT TO:<user@example.test\x00@remote.test>",
        b"RCPT TO:<user@example.test>\nDATA",
        b"RCPT TO:<a\rb@example.test>",
    ],
)
def test_control_characters_in_envelope_refused(
    line: bytes, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        code, text = c.cmd(line)
        assert code == 501 and "5.5.2" in text
    assert not any(cmd.startswith("RCPT") for cmd in backend.commands())
