"""The open-relay probe battery through real sessions: nothing non-local ever reaches
the backend. Routing tricks get 550 5.7.1; addresses that are not valid syntax at all
(empty or oversized local parts) get 501 5.1.3, the reply RFC 5321 gives malformed
paths; either way the backend never sees them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.security.helpers import greeted
from tests.support.procs import Backend, Gateway, base_config

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
    with greeted(gw.port()) as c:
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
    with greeted(gw.port()) as c:
        assert c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8")[0] == 250
        # "example.test" with a Cyrillic a (U+0430) for the first "a": a valid IDNA
        # 2008 name, and not ours.
        code, text = c.cmd("RCPT TO:<user@ex\u0430mple.test>")
        assert code == 550 and text.startswith("550 5.7.1"), text
        # Its UTF-8 read as Latin-1 ("exÐ°mple"): not a valid IDNA 2008 name at all.
        code, text = c.cmd("RCPT TO:<user@ex\u00d0\u00b0mple.test>")
        assert code == 553 and text.startswith("553 5.1.3"), text
        # Without SMTPUTF8 a non-ASCII address is refused before relay control.
        c.cmd("RSET")
        c.cmd("MAIL FROM:<a@sender.test>")
        code, _ = c.cmd("RCPT TO:<user@ex\u0430mple.test>")
        assert code == 553
    assert not any(cmd.startswith("RCPT") for cmd in backend.commands())


# Spellings of a local domain that UTS 46 would fold into it (full-width letters and
# dots, U+3002 as a dot) or that carry code points it ignores (soft hyphen, zero-
# width space, a variation selector): a backend offering SMTPUTF8 would receive them
# as written, which is not the domain relay control judged.
NOT_IDNA_2008 = [
    "<user@example.test\u3002>",
    "<user@exam\u00adple.test>",
    "<user@exam\u200bple.test>",
    "<user@example\ufe0f.test>",
    "<user@\uff45xample.test>",
    "<user@example\uff0etest>",
    "<user@b\u00fccher\u200d.test>",
    "<user@\u212aeep.example.test>",  # KELVIN SIGN, which lower() makes "k"
    "<user@B\u00dcCHER.test>",  # upper case: UTS 46 maps it, IDNA 2008 does not have it
]


@pytest.mark.parametrize("rcpt", NOT_IDNA_2008)
def test_domains_that_are_not_idna_2008_as_written_get_553(
    rcpt: str, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cfg = base_config(backend.url, local_domains=["example.test", "bücher.test"])
    gw = gateway_factory(cfg)
    with greeted(gw.port()) as c:
        assert c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8")[0] == 250
        code, text = c.cmd(f"RCPT TO:{rcpt}")
        assert (code, text[4:9]) == (553, "5.1.3"), text
        # The same domain written as IDNA 2008 has it: accepted, and relayed so.
        assert c.cmd("RCPT TO:<user@bücher.test>")[0] == 250
        # With a trailing dot, as the ASCII spelling with one: not ours.
        assert c.cmd("RCPT TO:<user@bücher.test.>")[1].startswith("550 5.7.1")
        # NEL and LINE SEPARATOR, which a backend may read as a line end: controls.
        assert c.cmd("RCPT TO:<us\u0085er@example.test>")[1].startswith("501 5.1.3")
        assert c.cmd("RCPT TO:<us\u2028er@example.test>")[1].startswith("501 5.1.3")
    assert [c for c in backend.commands() if c.startswith("RCPT")] == ["RCPT user@bücher.test"]


def test_invalid_utf8_and_encoded_controls_in_the_envelope_are_refused(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    with greeted(gw.port()) as c:
        assert c.cmd(b"MAIL FROM:<a\xff@sender.test> SMTPUTF8")[1].startswith("501 5.1.7")
        assert c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8 ENVID=x+0D+0AX-Injected:+20yes")[
            1
        ].startswith("501 5.5.4")
        assert c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8 ENVID=ok+2Bplus")[0] == 250
        assert c.cmd(b"RCPT TO:<us\xc3er@example.test>")[1].startswith("501 5.1.3")
        _, text = c.cmd("RCPT TO:<x@example.test> ORCPT=rfc822;x+0D+0Ay@example.test")
        assert text.startswith("501 5.5.4"), text
        _, text = c.cmd("RCPT TO:<x@example.test> ORCPT=utf-8;x\\x{0A}y@example.test")
        assert text.startswith("501 5.5.4"), text
        assert c.cmd("RCPT TO:<x@example.test> ORCPT=rfc822;x+2By@example.test")[0] == 250
    mails = [c for c in backend.commands() if c.startswith(("MAIL", "RCPT"))]
    assert all("\r" not in c and "+0D" not in c and "+0A" not in c for c in mails), mails


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
    with greeted(gw.port()) as c:
        c.cmd("MAIL FROM:<a@sender.test>")
        code, text = c.cmd(line)
        assert code == 501 and "5.5.2" in text
    assert not any(cmd.startswith("RCPT") for cmd in backend.commands())
