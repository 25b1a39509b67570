"""`smtp-gateway check`: what the gateway would answer to one message, and why.

It runs the gateway's own session (smtp/local.py: the listeners' Session, in
memory) with the very checks, policy and replies of the configuration, against
live DNS or the configured resolver, and a backend that accepts everything. So
every reply is the one a real client would get, word for word: the 554/421 of a
refusal at connect, the DNSBL zone named in the reply, the canonical rewrite
before the RCPT checks. It reports each command's reply, every stage's symbols,
the final action, and our Authentication-Results header.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import config, headers
from gateway.address import AddressError, parse_path
from gateway.checks.dnsbl import DnsblCheck
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.context import Context
from gateway.dns import Resolver
from gateway.facts import ScanFacts
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.runner import Runner, View
from gateway.smtp.local import AcceptingBackend, LocalSession, plain_listener, services
from gateway.smtp.services import Services
from gateway.store.memory import MemoryStore
from gateway.vocab import ACCEPT, AuthResult, Stage, Verdict, combine
from gateway.wire import stuff


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


@dataclass
class _Seen:
    """Each stage's verdict, and the transaction's facts as the last stage left them
    (the session clears them when the transaction ends)."""

    stages: list[tuple[str, Verdict]] = field(default_factory=list)
    auth: list[AuthResult] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    quarantine: bool = False
    trusted: bool = False
    scans: tuple[ScanFacts, ...] = ()


class _RecordingRunner(Runner):
    """The runner, noting what each stage decided for the report."""

    seen: _Seen

    async def run(self, stage: Stage, ctx: Context, view: View | None = None) -> Verdict:
        verdict = await super().run(stage, ctx, view)
        label = f"rcpt <{ctx.rcpt}>" if stage is Stage.RCPT else stage.value
        self.seen.stages.append((label, verdict))
        self.seen.auth = list(ctx.auth)
        self.seen.tags = list(ctx.tags)
        self.seen.quarantine = ctx.quarantine
        self.seen.trusted = ctx.trusted
        self.seen.scans = ctx.facts.scans
        return verdict


def _conversation(helo: str, mail_from: str, rcpts: list[str], message: bytes) -> list[str | bytes]:
    """What a client says to send this message: commands, and the message after DATA."""
    return [
        f"EHLO {helo}",
        f"MAIL FROM:<{mail_from}>",
        *(f"RCPT TO:<{r}>" for r in rcpts),
        "DATA",
        stuff(_crlf(message)),
    ]


async def play(
    svc: Services, client_ip: str, conversation: list[str | bytes], *, as_mta: bool = False
) -> list[dict[str, Any]]:
    """Each command (a str) or message (bytes, sent only after a 354) of
    `conversation`, with the session's reply, as a client that keeps to RFC 5321
    would play it: one at a time, stopping where the gateway closes the session,
    then QUIT. The first entry is the greeting, under "(connect)". `as_mta`: stop, as
    a sending MTA does, when the greeting or MAIL is refused."""
    session = LocalSession(svc, plain_listener(svc.settings, svc), (client_ip, 0))
    said: list[dict[str, Any]] = []

    def note(command: str, reply: list[str]) -> str:
        said.append({"command": command, "reply": reply})
        return reply[0][:3] if reply else ""

    code = note("(connect)", await session.start())
    for item in conversation:
        if session.closed or code == "421":  # 421: the gateway is closing (RFC 5321 3.8)
            break
        if as_mta and code[:1] in ("4", "5") and said[-1]["command"][:4] in ("(con", "MAIL"):
            break
        if isinstance(item, bytes):
            if code == "354":
                code = note("(message)", await session.message(item))
            continue
        code = note(item, await session.send(item))
    if not session.closed and code != "421":
        note("QUIT", await session.send("QUIT"))
    await session.close()
    return said


async def explain(
    settings: config.Settings,
    message: bytes,
    client_ip: str,
    helo: str,
    mail_from: str,
    rcpts: list[str],
) -> dict[str, Any]:
    try:
        parse_path(f"<{mail_from}>", allow_null=True)
        for r in rcpts:
            parse_path(f"<{r}>")
    except AddressError as e:
        raise config.ConfigError(f"bad address: {e}") from None
    runner, svc, backend = await offline_services(settings)
    said = await play(svc, client_ip, _conversation(helo, mail_from, rcpts, message), as_mta=True)
    any_rcpt = any(s["command"].startswith("RCPT") and s["reply"][0][:1] == "2" for s in said)
    return _report(settings, client_ip, runner.seen, said, backend, any_rcpt)


async def offline_services(
    settings: config.Settings,
) -> tuple[_RecordingRunner, Services, AcceptingBackend]:
    """The gateway's services for a session in memory: the configuration's checks
    and policy, DNS as configured, a fresh rate-limit store (explaining a message
    never charges the live limits), a backend that accepts. DNSBL zones are
    health-checked first, as the gateway does at start: a zone that fails its
    RFC 5782 test entries is skipped there, and so here."""
    # Nothing to catch by waiting: the greeting pause only costs the operator time.
    settings = settings.model_copy(
        update={"limits": settings.limits.model_copy(update={"greet_pause": 0})}
    )
    pol = policy_mod.load(settings.policy, all_known_symbols())
    checks = build_checks(settings, Resolver(settings.dns), MemoryStore())
    # The runner configures the checks: only then has the DNSBL check zones to test.
    runner = _RecordingRunner(checks, pol)
    runner.seen = _Seen()
    for check in checks:
        if isinstance(check, DnsblCheck) and pol.enabled(check.name):
            await check.health_check()
    backend = AcceptingBackend()
    return runner, services(settings, runner, backend), backend


def _report(
    settings: config.Settings,
    client_ip: str,
    seen: _Seen,
    said: list[dict[str, Any]],
    backend: AcceptingBackend,
    any_rcpt: bool,
) -> dict[str, Any]:
    final: Verdict = ACCEPT
    refused_at: str | None = None
    rcpt_refusal: Verdict | None = None
    for label, v in seen.stages:
        if label.startswith("rcpt") and v.refuses:
            rcpt_refusal = v  # refuses that recipient only, as in a session
            continue
        final = combine(final, v)
        if v.refuses and refused_at is None:
            refused_at = label
    if not any_rcpt and rcpt_refusal is not None and refused_at is None:
        final, refused_at = combine(final, rcpt_refusal), "rcpt"
    last = _deciding_reply(said, refused_at)
    authserv = settings.authserv_id or settings.hostname
    ar = headers.authentication_results(authserv, seen.auth).decode().rstrip("\r\n")
    relayed = backend.relayed[-1].prefix if backend.relayed else b""
    return {
        "client_ip": client_ip,
        "trusted": seen.trusted,
        "stages": [
            {"stage": label, "symbols": list(v.symbols), "action": v.action.value}
            for label, v in seen.stages
        ],
        "refused_at": refused_at,
        "action": final.action.value,
        "deciding_symbol": final.symbol,
        "tags": seen.tags,
        "quarantine": seen.quarantine,
        "reply": "\n".join(last),
        "conversation": said,
        "results": [
            {
                "method": a.method,
                "result": a.result,
                **a.props,
                **({"reason": a.reason} if a.reason else {}),
            }
            for a in seen.auth
        ],
        "authentication_results": ar,
        # What each content scanner said (a virus's signature name is only here).
        "scans": [
            {"scanner": f.scanner, "verdict": f.verdict, "detail": f.detail} for f in seen.scans
        ],
        # What the backend would have received in front of the message: our fields.
        "added_fields": relayed.decode("utf-8", "replace"),
    }


# The verdict in the exit status (1 and 2 are the command line's errors).
EXIT_VERDICT = {"accept": 0, "tag": 3, "quarantine": 4, "tempfail": 5, "reject": 6}


# The conversation's entry for each stage, by the start of its command.
_STAGE_COMMAND = {"connect": "(connect)", "helo": "EHLO", "mail": "MAIL", "rcpt": "RCPT",
                  "data": "(message)"}  # fmt: skip


def _deciding_reply(said: list[dict[str, Any]], refused_at: str | None) -> list[str]:
    """The reply that decided the message: the refusing stage's (of recipients, the
    first one refused: a DATA refused for want of recipients only follows it), else
    the last reply before QUIT (the message's acceptance)."""
    spoken = [s for s in said if s["command"] != "QUIT"]
    if refused_at is not None:
        start = _STAGE_COMMAND.get(refused_at.split(" ")[0])
        for s in spoken:
            reply = s["reply"]
            if start and s["command"].startswith(start) and reply and reply[0][:1] in ("4", "5"):
                return list(reply)
    refusals = [s["reply"] for s in spoken if s["reply"] and s["reply"][0][:1] in ("4", "5")]
    # A command the session answered by closing has an empty reply: the one before
    # it decided.
    answered = [s["reply"] for s in spoken if s["reply"]]
    last = answered[-1] if answered else []
    return list(last if (last and last[0][:1] == "2") or not refusals else refusals[0])


def run(args: Any) -> int:
    settings = config.load(args.config)
    message = Path(args.message).read_bytes()
    out = asyncio.run(
        explain(settings, message, args.client_ip, args.helo, args.mail_from, args.rcpt)
    )
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_VERDICT[out["action"]]
    print(
        f"client {out['client_ip']}{' (trusted: sender checks skipped)' if out['trusted'] else ''}"
    )
    for s in out["conversation"]:
        print(f"  > {s['command']}")
        for line in s["reply"]:
            print(f"  < {line}")
    for s in out["stages"]:
        print(f"  {s['stage']:<28} {s['action']:<10} {', '.join(s['symbols']) or '-'}")
    print("results:")
    for r in out["results"]:
        extra = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("method", "result"))
        print(f"  {r['method']}={r['result']} {extra}")
    if out["scans"]:
        print("scans:")
        for sc in out["scans"]:
            print(
                f"  {sc['scanner']}: {sc['verdict']}"
                + (f" ({sc['detail']})" if sc["detail"] else "")
            )
    print(
        f"action: {out['action']}"
        + (f" ({out['deciding_symbol']})" if out["deciding_symbol"] else "")
    )
    print(f"reply:  {out['reply']}")
    print(out["authentication_results"])
    return EXIT_VERDICT[out["action"]]
