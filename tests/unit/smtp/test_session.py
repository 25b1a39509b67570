"""The session's own loop (gateway/smtp/session.py), driven in memory
(tests/unit/smtp/sessions.py): errors and junk counted to 421, pipelining out of
turn, commands it cannot take, and one accounting of every refusal."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import REGISTRY

from gateway import config, metrics, replies
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.dns import Resolver
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.runner import Runner
from gateway.smtp.local import AcceptingBackend, LocalSession, plain_listener, services
from gateway.smtp.session import Session
from gateway.store.memory import MemoryStore
from gateway.vocab import Action, Stage, Verdict
from tests.unit.smtp.sessions import session_run


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


def sample(name: str, **labels: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_refusals_are_counted_at_connect_and_at_rcpt(tmp_path: Path) -> None:
    """A client past its concurrency slot is refused at connect (421): counted as a
    refused connection and a refusal at connect, not as an accepted connection;
    a relay attempt is a refusal at RCPT."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "checks:\n"
        + "".join(f"  {c}: {{enabled: false}}\n" for c in ("spf", "dkim", "dmarc", "arc", "dnsbl"))
        + "  ratelimit:\n    concurrency:\n      - {name: one, key: client_ip, max: 1}\n"
        + "actions: {ratelimit.concurrency: tempfail}\n"
    )
    settings = config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
            "policy": str(policy),
            "listeners": [{"name": "acct", "port": 2525}],
            "dns": {"nameservers": ["127.0.0.1:9"]},
        }
    )
    conn = "smtp_gateway_connections_total"
    refusals = "smtp_gateway_refusals_total"
    before = {
        "accepted": sample(conn, listener="acct", result="accepted"),
        "refused": sample(conn, listener="acct", result="refused_policy"),
        "connect": sample(
            refusals, stage="connect", action="tempfail", reason="ratelimit.concurrency"
        ),
        "rcpt": sample(refusals, stage="rcpt", action="reject", reason="relay.denied"),
    }

    async def go() -> tuple[list[str], list[str]]:
        pol = policy_mod.load(settings.policy, all_known_symbols())
        runner = Runner(build_checks(settings, Resolver(settings.dns), MemoryStore()), pol)
        svc = services(settings, runner, AcceptingBackend())
        first = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4000))
        second = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4001))
        try:
            await first.start()
            greeting = await second.start()
            await first.send("EHLO c.test")
            await first.send("MAIL FROM:<a@sender.test>")
            rcpt = await first.send("RCPT TO:<x@elsewhere.test>")
            return greeting, rcpt
        finally:
            await first.close()
            await second.close()

    greeting, rcpt = asyncio.run(go())
    assert greeting[0].startswith("421 4.7.0") and rcpt[0].startswith("550")
    assert sample(conn, listener="acct", result="accepted") == before["accepted"] + 1
    assert sample(conn, listener="acct", result="refused_policy") == before["refused"] + 1
    assert (
        sample(refusals, stage="connect", action="tempfail", reason="ratelimit.concurrency")
        == before["connect"] + 1
    )
    assert (
        sample(refusals, stage="rcpt", action="reject", reason="relay.denied") == before["rcpt"] + 1
    )


def test_a_refusal_at_connect_is_554_or_421_and_elsewhere_the_policys_own_reply(
    settings: config.Settings,
) -> None:
    """RFC 5321 3.1 / 4.3.2: a greeting refusal is 554, a temporary one 421."""

    async def play(s: LocalSession, backend: AcceptingBackend) -> list[str]:
        sess: Session = s.session
        reject = Verdict(Action.REJECT, "relay.denied")
        tempfail = Verdict(Action.TEMPFAIL, "dnsbl.listed")
        sess.ctx.details["dnsbl.listed"] = "zone.test"
        return [
            str(sess.policy_reply(reject, Stage.CONNECT)),
            str(sess.policy_reply(tempfail, Stage.CONNECT)),
            str(sess.policy_reply(reject, Stage.RCPT)),
            str(sess.policy_reply(tempfail, Stage.MAIL)),
        ]

    assert session_run(settings, play) == [
        "554 5.7.1 Relay access denied",
        "421 4.7.0 Service unavailable; client listed at zone.test",
        "550 5.7.1 Relay access denied",
        "450 4.7.1 Service unavailable; client listed at zone.test",
    ]


def test_refusals_count_toward_max_errors_but_the_backends_replies_do_not(
    settings: config.Settings,
) -> None:
    async def play(s: LocalSession, backend: AcceptingBackend) -> list[int]:
        sess: Session = s.session
        counts = []
        for reply, policy in (
            (replies.SYNTAX_ARGS, False),  # the client's mistake
            (replies.for_action(Action.REJECT, "relay.denied"), True),  # the policy's
            (replies.from_backend(550, ["5.1.1 unknown"]), False),  # the backend's
            (replies.BACKEND_LOST, False),  # a 4xx
        ):
            sess.send(reply, policy=policy)
            counts.append(sess.errors)
        return counts

    assert session_run(settings, play) == [1, 2, 2, 2]
