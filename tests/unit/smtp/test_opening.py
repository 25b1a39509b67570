"""The start of a session (gateway/smtp/opening.py), in memory: the greeting, a
refusal at connect (554 and a bounded wait for QUIT, or 421), a client that talks
before the greeting, STARTTLS where it is not offered."""

from __future__ import annotations

from pathlib import Path

from gateway import config, replies
from gateway.smtp.local import AcceptingBackend, LocalSession
from gateway.smtp.opening import AFTER_554_COMMANDS
from gateway.store.memory import MemoryStore
from tests.unit.smtp.sessions import POLICY, session_run


def limited(settings: config.Settings, tmp_path: Path, action: str) -> config.Settings:
    """A policy of one connection per client, refused with `action` past it."""
    (tmp_path / "conc.yaml").write_text(
        POLICY
        + "  ratelimit:\n    concurrency:\n      - {name: one, key: client_ip, max: 1}\n"
        + f"actions:\n  ratelimit.concurrency: {action}\n"
    )
    return settings.model_copy(update={"policy": str(tmp_path / "conc.yaml")})


def busy() -> MemoryStore:
    """The store as it is while the session's client holds its one connection."""
    store = MemoryStore()
    assert store.acquire("conc:one:192.0.2.7", 1)
    return store


def test_the_greeting_names_the_host(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[str]:
        return await s.start()

    assert session_run(settings, play) == ["220 mx.gw.test ESMTP ready"]


def test_a_temporary_refusal_at_connect_is_421_and_the_end(
    settings: config.Settings, tmp_path: Path
) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> tuple[list[str], bool]:
        greeting = await s.start()
        await s.close()
        return greeting, s.closed

    greeting, closed = session_run(limited(settings, tmp_path, "tempfail"), play, busy())
    assert greeting == ["421 4.7.0 Too many connections from your address"] and closed


def test_a_refusal_at_connect_is_554_and_only_quit_is_taken_after_it(
    settings: config.Settings, tmp_path: Path
) -> None:
    """RFC 5321 3.1: after a 554 greeting, 503 to anything but QUIT."""

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[list[str]]:
        return [await s.start(), await s.send("EHLO client.test"), await s.send("QUIT")]

    greeting, ehlo, quit_ = session_run(limited(settings, tmp_path, "reject"), play, busy())
    assert greeting == ["554 5.7.1 Message rejected by policy"]
    assert ehlo == [str(replies.REFUSED_SESSION)]
    assert quit_ == [str(replies.BYE)]


def test_the_wait_for_quit_after_554_is_bounded_in_commands(
    settings: config.Settings, tmp_path: Path
) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[list[str]]:
        await s.start()
        return [await s.send("NOOP") for _ in range(AFTER_554_COMMANDS + 1)]

    out = session_run(limited(settings, tmp_path, "reject"), play, busy())
    assert out[:AFTER_554_COMMANDS] == [[str(replies.REFUSED_SESSION)]] * AFTER_554_COMMANDS
    assert out[AFTER_554_COMMANDS] == []  # closed: no more answers


def test_a_client_that_talks_before_the_greeting_is_told_and_closed(
    settings: config.Settings,
) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> tuple[list[str], bool]:
        s.stream.data_received(b"EHLO eager.test\r\n")  # before the 220
        reply = await s.start()
        await s.close()
        return reply, s.closed

    reply, closed = session_run(settings, play)
    assert reply == [str(replies.PREGREET)] and closed


def test_a_trusted_client_may_talk_first(settings: config.Settings) -> None:
    trusted = config.Settings.model_validate(
        {**settings.model_dump(mode="json"), "trusted_networks": ["192.0.2.0/24"]}
    )

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[list[str]]:
        s.stream.data_received(b"NOOP\r\n")
        return [await s.start(), await s._reply()]

    greeting, noop = session_run(trusted, play)
    assert greeting == ["220 mx.gw.test ESMTP ready"] and noop == ["250 2.0.0 OK"]


def test_starttls_where_it_is_not_offered(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[str]:
        await s.start()
        await s.send("EHLO client.test")
        return await s.send("STARTTLS")

    assert session_run(settings, play) == [str(replies.TLS_NOT_OFFERED)]
