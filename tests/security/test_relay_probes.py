"""The open-relay probe battery through real sessions: nothing non-local ever reaches
the backend. Routing tricks get 550 5.7.1; addresses that are not valid syntax at all
(empty or oversized local parts) get 501 5.1.3, the reply RFC 5321 gives malformed
paths; either way the backend never sees them."""

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
    "<user@[IPv6:::1]>",
    "<user@Remote.TEST>",  # mixed case of a foreign domain
    "<USER%REMOTE.TEST@EXAMPLE.TEST>",  # mixed-case percent hack
    "<user%remote.test%example.test@example.test>",
    "<remote.test!other.test!user@example.test>",
    '<"user%remote.test"@example.test>',
    '<"@remote.test:user"@example.test>',
    "<user@example.test.remote.test.>",
]


def probe(gw: Gateway, rcpt: str, then: str | None = None) -> tuple[int, str]:
    """The reply to RCPT TO:rcpt; with `then`, that command must get 554 (nothing valid)."""
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        reply = c.cmd(f"RCPT TO:{rcpt}")
        if then is not None:
            assert c.cmd(then)[0] == 554  # no valid recipients
    return reply


# Syntax, not routing: refused as malformed, never relayed.
MALFORMED = [
    "<@example.test>",
    "<" + "a" * 65 + "@example.test>",
    "<user@example.test@remote.test>",
    "<user@>",
    "<user>",
    "<user@example..test>",
]


@pytest.mark.parametrize("rcpt", MALFORMED)
def test_malformed_recipients_get_501_and_never_reach_backend(
    rcpt: str, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    code, text = probe(gateway_factory(base_config(backend.url)), rcpt)
    assert (code, text[4:9]) in ((501, "5.1.3"), (550, "5.7.1")), text
    assert not any(cmd.startswith("RCPT") for cmd in backend.commands())


def test_unicode_look_alike_of_a_local_domain_is_foreign(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8")[0] == 250
        # "example.test" with a Cyrillic a (U+0430) for the first "a".
        code, text = c.cmd("RCPT TO:<user@ex\u0430mple.test>".encode().decode("unicode_escape"))
        assert code == 550 and text.startswith("550 5.7.1"), text
        # Without SMTPUTF8 a non-ASCII address is refused before relay control.
        c.cmd("RSET")
        c.cmd("MAIL FROM:<a@sender.test>")
        code, _ = c.cmd("RCPT TO:<user@ex\u0430mple.test>".encode().decode("unicode_escape"))
        assert code == 553
    assert not any(cmd.startswith("RCPT") for cmd in backend.commands())


@pytest.mark.parametrize("rcpt", TRICKS)
def test_relay_tricks_get_550_571_and_never_reach_backend(
    rcpt: str, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    code, text = probe(gateway_factory(base_config(backend.url)), rcpt, then="DATA")
    assert code == 550 and text.startswith("550 5.7.1"), text
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
    code, text = probe(gateway_factory(base_config(backend.url)), rcpt)
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
