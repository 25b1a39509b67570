"""HELO, MAIL and RCPT (gateway/smtp/envelope.py) in the in-memory session: sequence,
relay control, the policy a transaction keeps, a rate limit at MAIL on a clock the
test moves."""

from __future__ import annotations

from pathlib import Path

from gateway import config, replies
from gateway.checks.registry import all_known_symbols
from gateway.pipeline import policy as policy_mod
from gateway.smtp import envelope
from gateway.smtp.local import AcceptingBackend, LocalSession
from gateway.store.memory import MemoryStore
from tests.unit.fakes import Clock
from tests.unit.smtp.sessions import POLICY, RATE_LIMITED, session_run


def test_relay_control_and_sequence_replies(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[list[str]]:
        await s.start()
        return [
            await s.send("MAIL FROM:<a@sender.test>"),
            await s.send("EHLO client.test"),
            await s.send("RCPT TO:<x@example.test>"),
            await s.send("MAIL FROM:<a@sender.test>"),
            await s.send("RCPT TO:<x@remote.test>"),
            await s.send("DATA"),
        ]

    need_helo, _, need_mail, _, relay, data = session_run(settings, play)
    assert need_helo == [str(replies.NEED_HELO)]
    assert need_mail == [str(replies.NEED_MAIL)]
    assert relay == ["550 5.7.1 Relay access denied"]
    assert data == [str(replies.NO_VALID_RECIPIENTS)]


def test_a_transaction_runs_under_the_policy_of_its_mail(
    settings: config.Settings, tmp_path: Path
) -> None:
    """A reload between MAIL and RCPT applies from the next transaction: the open one
    keeps the policy it began with (its actions, and which checks run)."""
    (tmp_path / "tempfail.yaml").write_text(POLICY + "actions:\n  relay.denied: tempfail\n")
    reloaded = policy_mod.load(str(tmp_path / "tempfail.yaml"), all_known_symbols())

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[list[str]]:
        await s.start()
        await s.send("EHLO client.test")
        await s.send("MAIL FROM:<a@sender.test>")
        s.session.svc.runner.swap_policy(reloaded)  # SIGHUP, mid-transaction
        during = await s.send("RCPT TO:<x@remote.test>")
        await s.send("RSET")
        await s.send("MAIL FROM:<a@sender.test>")
        after = await s.send("RCPT TO:<x@remote.test>")
        return [during, after]

    during, after = session_run(settings, play)
    assert during == ["550 5.7.1 Relay access denied"]  # the policy at MAIL: reject
    assert after == ["450 4.7.1 Relay access denied"]  # the reloaded one: tempfail


def test_message_limit_recovers_after_one_cell_of_its_window(
    settings: config.Settings, tmp_path: Path
) -> None:
    """3/2s: one cell (one message's worth of the limit) comes back every 2/3 s.
    The store runs on a clock the test moves, so "after the window" is exact: the
    fourth message is refused until a cell has drained, and then only one more fits."""
    (tmp_path / "limited.yaml").write_text(
        POLICY
        + "  ratelimit:\n    limits:\n"
        + "      - {name: msgs, key: client_ip, unit: messages, rate: 3/2s}\n"
        + "    concurrency: []\n"
        + "actions:\n  ratelimit.exceeded: tempfail\n"
    )
    limited = settings.model_copy(update={"policy": str(tmp_path / "limited.yaml")})
    cell = 2 / 3
    clock = Clock()

    async def message(s: LocalSession) -> list[str]:
        """One transaction: the MAIL refusal, or the reply at the end of the data."""
        mail = await s.send("MAIL FROM:<a@sender.test>")
        if mail[0][:3] != "250":
            return mail
        assert (await s.send("RCPT TO:<x@example.test>"))[0][:3] == "250"
        assert (await s.send("DATA"))[0][:3] == "354"
        return await s.message(b"Subject: r\r\n\r\nhi\r\n")

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[list[str]]:
        await s.start()
        await s.send("EHLO client.test")
        out = [await message(s) for _ in range(4)]  # all at one instant
        clock.t += cell - 0.01
        out.append(await message(s))  # just under one cell: still refused
        clock.t += 0.02
        out.append(await message(s))  # just past it: one message fits again
        out.append(await message(s))  # and only one
        assert len(backend.relayed) == 4
        return out

    out = session_run(limited, play, MemoryStore(clock))
    accepted = ["250 2.0.0 Ok: queued"]  # the accepting backend's reply, relayed
    assert out == [accepted] * 3 + [RATE_LIMITED] * 2 + [accepted] + [RATE_LIMITED]


def test_a_helo_name_is_its_first_word_at_most_255_octets(settings: config.Settings) -> None:
    """What goes into the Received field and the backend's XCLIENT is bounded however
    long the client's line (envelope.helo called as the session calls it)."""

    async def play(s: LocalSession, backend: AcceptingBackend) -> tuple[str | None, bytes]:
        await s.start()
        await envelope.helo(s.session, "h" * 300 + ".test trailing words")
        return s.session.ctx.helo, b"".join(s.session.out)

    helo, reply = session_run(settings, play)
    assert helo == "h" * 255
    assert reply == b"250 mx.gw.test\r\n"


def test_an_empty_helo_is_a_syntax_error_and_changes_nothing(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> tuple[str | None, list[str]]:
        await s.start()
        await s.send("EHLO client.test")
        await envelope.ehlo(s.session, "")
        return s.session.ctx.helo, [x.decode() for x in s.session.out]

    helo, out = session_run(settings, play)
    assert helo == "client.test" and out == [replies.SYNTAX_HELO.wire().decode()]


def test_a_mail_with_a_size_over_the_limit_is_refused_before_any_data(
    settings: config.Settings,
) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[str]:
        await s.start()
        await s.send("EHLO client.test")
        size = settings.limits.max_message_size + 1
        return await s.send(f"MAIL FROM:<a@sender.test> SIZE={size}")

    assert session_run(settings, play) == [str(replies.SIZE_EXCEEDED)]
