"""SMTP smuggling: every end-of-data variant, bare CR/LF in headers and body, NUL, in both
bare_linefeed modes, against the strict backend (aiosmtpd) and a lenient one that ends
DATA at any lone "." line. Never two messages at the backend, never a second envelope."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient

SMUGGLE = [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"]
SMUGGLED = (
    b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nevil\r\n"
)


def send_raw(port: int, data: bytes) -> tuple[int, str]:
    with RawClient(port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<x@example.test>")
        assert c.cmd("DATA")[0] == 354
        c.send(data + b".\r\n")
        reply = c.reply()
        assert c.cmd("QUIT")[0] == 221
    return reply


def pair(
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
    lenient: bool,
    mode: str,
) -> tuple[Backend, Gateway]:
    be = backend_factory("--lenient") if lenient else backend_factory()
    return be, gateway_factory(base_config(be.url, limits={"bare_linefeed": mode}))


def assert_one_envelope_at_most(backend: Backend, expected: int) -> None:
    msgs = backend.messages()
    assert len(msgs) == expected
    assert not any("evil@evil.test" in cmd for cmd in backend.commands())
    # One envelope at most (a refused message's MAIL is reset, never a second one).
    mails = [cmd for cmd in backend.commands() if cmd.upper().startswith("MAIL")]
    assert len(mails) <= 1 and all("a@sender.test" in m for m in mails), mails
    for m in msgs:
        assert m["mail_from"] == "a@sender.test"
        assert m["data"].count(b"\n") == m["data"].count(b"\r\n")  # CRLF only


@pytest.mark.parametrize("lenient", [False, True], ids=["strict-backend", "lenient-backend"])
@pytest.mark.parametrize("mode", ["reject", "normalize"])
@pytest.mark.parametrize("seq", SMUGGLE, ids=[repr(s) for s in SMUGGLE])
def test_end_of_data_variants_never_yield_two_messages(
    seq: bytes,
    mode: str,
    lenient: bool,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    be, gw = pair(backend_factory, gateway_factory, lenient, mode)
    code, text = send_raw(gw.port(), b"Subject: first\r\n\r\nbody" + seq + SMUGGLED)
    if mode == "reject":
        assert (code, text[4:9]) == (550, "5.5.2")
    else:
        assert code == 250
    assert_one_envelope_at_most(be, 0 if mode == "reject" else 1)
    if mode == "normalize":
        # The would-be commands are body text of the one message.
        assert b"MAIL FROM:<evil@evil.test>\r\n" in be.messages()[0]["data"]


@pytest.mark.parametrize("lenient", [False, True], ids=["strict-backend", "lenient-backend"])
@pytest.mark.parametrize(
    "payload",
    [
        b"Subject: a\nBcc: injected@evil.test\r\n\r\nbody\r\n",  # bare LF in the header
        b"Subject: a\rX-Injected: 1\r\n\r\nbody\r\n",  # bare CR in the header
        b"Subject: a\r\n\r\nline one\nline two\r\n",  # bare LF in the body
        b"Subject: a\r\n\r\nline one\rline two\r\n",  # bare CR in the body
    ],
)
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_bare_cr_lf_in_headers_and_body(
    payload: bytes,
    mode: str,
    lenient: bool,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    be, gw = pair(backend_factory, gateway_factory, lenient, mode)
    code, text = send_raw(gw.port(), payload)
    if mode == "reject":
        assert (code, text[4:9]) == (550, "5.5.2")
        assert_one_envelope_at_most(be, 0)
    else:
        assert code == 250
        assert_one_envelope_at_most(be, 1)


@pytest.mark.parametrize("lenient", [False, True], ids=["strict-backend", "lenient-backend"])
def test_nul_inside_is_refused(
    lenient: bool,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    be, gw = pair(backend_factory, gateway_factory, lenient, "normalize")
    code, text = send_raw(gw.port(), b"Subject: a\r\n\r\nnul\x00\n.\n" + SMUGGLED)
    assert (code, text[4:9]) == (550, "5.6.0")
    assert_one_envelope_at_most(be, 0)
