"""DATA (gateway/smtp/message.py) in the in-memory session: what the backend is handed."""

from __future__ import annotations

from typing import Any

from gateway import config, replies
from gateway.smtp import message
from gateway.smtp.local import AcceptingBackend, LocalSession
from tests.unit.smtp.sessions import session_run


def test_a_message_is_relayed_with_our_fields_in_front(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> Any:
        assert await s.start() == ["220 mx.gw.test ESMTP ready"]
        ehlo = await s.send("EHLO client.test")
        assert ehlo[0] == "250-mx.gw.test" and "250-PIPELINING" in ehlo and ehlo[-1][3] == " "
        assert (await s.send("MAIL FROM:<a@sender.test>"))[0][:3] == "250"
        assert (await s.send("RCPT TO:<x@example.test>"))[0][:3] == "250"
        assert await s.send("DATA") == [replies.START_DATA.wire().decode().rstrip("\r\n")]
        assert (await s.message(b"Subject: s\r\n\r\n..dot\r\n"))[0][:3] == "250"
        assert await s.send("QUIT") == ["221 2.0.0 Bye"]
        return backend.relayed

    [relayed] = session_run(settings, play)
    assert relayed.sender == "a@sender.test" and relayed.recipients == ["x@example.test"]
    assert relayed.message == b"Subject: s\r\n\r\n..dot\r\n"  # stuffed as received
    assert relayed.prefix.startswith(b"Received: from client.test (")
    assert b"192.0.2.7" in relayed.prefix
    assert b"\r\nAuthentication-Results: mx.gw.test" in relayed.prefix


def transaction(s: LocalSession, *rcpts: str, mail: str = "MAIL FROM:<a@sender.test>") -> Any:
    async def go() -> None:
        await s.send("EHLO client.test")
        await s.send(mail)
        for r in rcpts:
            await s.send(f"RCPT TO:<{r}>")

    return go()


def test_the_received_field_says_how_the_message_came(settings: config.Settings) -> None:
    """RFC 6531 3.7.3: a transaction under SMTPUTF8 is received "with UTF8SMTP"; one
    recipient is named (RFC 5321 4.4), several are not (they would see each other)."""

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[bytes]:
        await s.start()
        await transaction(s, "x@example.test", mail="MAIL FROM:<a@sender.test> SMTPUTF8")
        one = message._received(s.session)
        await s.send("RSET")
        await transaction(s, "x@example.test", "y@example.test")
        return [one, message._received(s.session)]

    one, two = session_run(settings, play)
    assert b"with UTF8SMTP id " in one and b"for <x@example.test>;" in one
    assert b"with ESMTP id " in two and b"for <" not in two


def test_a_message_header_that_would_continue_ours_is_refused(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> tuple[list[str], int]:
        await s.start()
        await transaction(s, "x@example.test")
        await s.send("DATA")
        out = await s.message(b" folded: onto our Received\r\nSubject: s\r\n\r\nhi\r\n")
        return out, len(backend.relayed[0].message)

    out, relayed = session_run(settings, play)
    assert out == [str(replies.HEADER_STARTS_FOLDED)] and relayed == 0


def test_a_field_the_delivering_mta_adds_is_not_the_senders_to_write(
    settings: config.Settings,
) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> bytes:
        await s.start()
        await transaction(s, "x@example.test")
        await s.send("DATA")
        await s.message(b"X-Original-To: ceo@example.test\r\nSubject: s\r\n\r\nhi\r\n")
        return backend.relayed[0].message

    assert "X-Original-To" in message._MTA_FIELDS
    assert session_run(settings, play) == b"Subject: s\r\n\r\nhi\r\n"
