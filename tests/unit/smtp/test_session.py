"""The gateway's session in memory (smtp/local.py): the listeners' own Session,
driven command by command without a socket, a process or a backend server.

The policy turns off the checks that need DNS; relay control, the rate limiter
and the TLS policy run as they do live.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway import config, replies
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.dns import Resolver
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.runner import Runner
from gateway.smtp.local import AcceptingBackend, LocalSession, plain_listener, services
from gateway.store.memory import MemoryStore
from tests.unit.test_ratelimit import Clock

T = TypeVar("T")

POLICY = """
checks:
  spf: {enabled: false}
  dkim: {enabled: false}
  dmarc: {enabled: false}
  arc: {enabled: false}
  dnsbl: {enabled: false}
"""


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    (tmp_path / "policy.yaml").write_text(POLICY)
    return config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
            "policy": str(tmp_path / "policy.yaml"),
            "limits": {"max_errors": 5, "max_junk_commands": 3},
        }
    )


def session_run(
    settings: config.Settings,
    play: Callable[[LocalSession, AcceptingBackend], Awaitable[T]],
    store: MemoryStore | None = None,
) -> T:
    """`play` against one session; `store`: the rate-limit store (a fresh one if None)."""

    async def go() -> T:
        pol = policy_mod.load(settings.policy, all_known_symbols())
        limits = MemoryStore() if store is None else store
        runner = Runner(build_checks(settings, Resolver(settings.dns), limits), pol)
        backend = AcceptingBackend()
        svc = services(settings, runner, backend)
        s = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4000))
        try:
            return await play(s, backend)
        finally:
            await s.close()

    return asyncio.run(go())


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


def test_junk_past_the_limit_counts_as_errors_until_421(settings: config.Settings) -> None:
    """max_junk_commands 3, max_errors 5: NOOPs four to eight are an error each (still
    answered), and the next command gets 421 and the end of the session."""

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[list[str]]:
        await s.start()
        return [await s.send("NOOP") for _ in range(10)]

    out = session_run(settings, play)
    assert out[:8] == [["250 2.0.0 OK"]] * 8
    assert out[8] == [str(replies.TOO_MANY_ERRORS)]
    assert out[9] == []  # closed


def test_pipelining_out_of_turn_ends_the_session(settings: config.Settings) -> None:
    """RFC 2920: nothing may follow EHLO before its reply (a client that does not
    wait for replies, or a smuggled command)."""

    async def play(s: LocalSession, backend: AcceptingBackend) -> tuple[list[str], bool]:
        await s.start()
        reply = await s.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>")
        await asyncio.sleep(0)  # a turn of the loop for the close to land
        return reply, s.closed

    reply, closed = session_run(settings, play)
    assert reply == [str(replies.SYNC_ERROR)] and closed


def test_control_characters_and_unknown_commands(settings: config.Settings) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[list[str]]:
        await s.start()
        return [await s.send(b"NOOP\x1b[2J"), await s.send("FROB"), await s.send("HELO")]

    ctl, unknown, helo = session_run(settings, play)
    assert ctl == [str(replies.CONTROL_CHARS)]
    assert unknown == [str(replies.SYNTAX_UNRECOGNIZED)]
    assert helo == [str(replies.SYNTAX_HELO)]


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


# What a client refused by a rate limit reads (replies.py, ratelimit.exceeded: tempfail).
RATE_LIMITED = ["450 4.7.1 Rate limit exceeded, try again later"]


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


def test_a_refused_mail_is_logged_with_its_sender(
    settings: config.Settings, tmp_path: Path
) -> None:
    """The transaction line of a MAIL the policy defers names the sender: an
    operator looking for a sender's deferred mail finds it."""
    import io
    import json
    import logging

    from gateway import logs

    (tmp_path / "limited.yaml").write_text(
        POLICY
        + "  ratelimit:\n    limits:\n"
        + "      - {name: msgs, key: client_ip, unit: messages, rate: 1/hour}\n"
        + "    concurrency: []\n"
        + "actions:\n  ratelimit.exceeded: tempfail\n"
    )
    limited = settings.model_copy(update={"policy": str(tmp_path / "limited.yaml")})
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("INFO", "json", stream)

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[str]:
        await s.start()
        await s.send("EHLO client.test")
        first = await s.send("MAIL FROM:<first@sender.test>")
        await s.send("RCPT TO:<x@example.test>")
        await s.send("DATA")
        await s.message(b"Subject: s\r\n\r\nhi\r\n")
        second = await s.send("MAIL FROM:<second@sender.test>")
        return [first[0], second[0]]

    try:
        replies_seen = session_run(limited, play)
        logs.flush()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert replies_seen == ["250 2.1.0 Ok", RATE_LIMITED[0]]
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    txns = [x for x in lines if x.get("event") == "transaction"]
    assert [(t["mail_from"], t["outcome"], t["reason"]) for t in txns] == [
        ("first@sender.test", "delivered", "backend"),
        ("second@sender.test", "tempfailed", "ratelimit.exceeded"),
    ]
