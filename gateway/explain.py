"""`smtp-gateway check`: the pipeline's verdict on one message, without a backend.

Runs the very checks, policy and reply table the gateway uses, stage by stage
as a session would (CONNECT, HELO, MAIL, each RCPT, DATA), against live DNS or
the configured resolver, and reports every check's findings, the final
action, the reply the client would get, and our Authentication-Results header.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from gateway import config, headers, replies
from gateway.address import AddressError, parse_path
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.context import Context
from gateway.dns import Resolver
from gateway.net import network_matcher
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.runner import Runner
from gateway.store.memory import MemoryStore
from gateway.vocab import ACCEPT, Stage, Verdict, combine
from gateway.wire import stuff


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


async def explain(
    settings: config.Settings,
    message: bytes,
    client_ip: str,
    helo: str,
    mail_from: str,
    rcpts: list[str],
) -> dict[str, Any]:
    pol = policy_mod.load(settings.policy, all_known_symbols())
    resolver = Resolver(settings.dns)
    # A fresh in-memory store: explaining a message never charges the live limits.
    runner = Runner(build_checks(settings, resolver, MemoryStore()), pol)
    ctx = Context("explain", client_ip, 0, "check", helo=helo)
    ctx.trusted = network_matcher(settings.trusted_networks)(client_ip)
    stages: list[dict[str, Any]] = []
    final: Verdict = ACCEPT
    refused_at: str | None = None
    rcpt_refusal: Verdict | None = None

    async def stage(name: Stage, label: str | None = None) -> bool:
        nonlocal final, refused_at, rcpt_refusal
        v = await runner.run(name, ctx)
        stages.append(
            {"stage": label or name.value, "symbols": list(v.symbols), "action": v.action.value}
        )
        if name is Stage.RCPT and v.refuses:
            rcpt_refusal = v  # refuses that recipient only, as in a session
            return False
        final = combine(final, v)
        if v.refuses:
            refused_at = label or name.value
            return False
        return True

    try:
        ctx.mail_from = parse_path(f"<{mail_from}>", allow_null=True)
        parsed = [parse_path(f"<{r}>") for r in rcpts]
    except AddressError as e:
        raise config.ConfigError(f"bad address: {e}") from None
    ok = await stage(Stage.CONNECT) and await stage(Stage.HELO) and await stage(Stage.MAIL)
    if ok:
        for r in parsed:
            ctx.rcpt = r
            if await stage(Stage.RCPT, f"rcpt <{r}>"):
                ctx.recipients.append(r)
        if ctx.recipients:
            ctx.wire = stuff(_crlf(message))
            await stage(Stage.DATA)
        elif rcpt_refusal is not None:
            final, refused_at = combine(final, rcpt_refusal), "rcpt"
    if final.refuses:
        reply = str(replies.for_action(final.action, final.symbol))
    elif not ctx.recipients:
        reply = str(replies.NO_VALID_RECIPIENTS)
    else:
        reply = "250 (the backend's own reply to DATA)"
    authserv = settings.authserv_id or settings.hostname
    ar = headers.authentication_results(authserv, ctx.auth).decode().rstrip("\r\n")
    return {
        "client_ip": client_ip,
        "trusted": ctx.trusted,
        "stages": stages,
        "refused_at": refused_at,
        "action": final.action.value,
        "deciding_symbol": final.symbol,
        "tags": ctx.tags,
        "quarantine": ctx.quarantine,
        "reply": reply,
        "results": [
            {
                "method": a.method,
                "result": a.result,
                **a.props,
                **({"reason": a.reason} if a.reason else {}),
            }
            for a in ctx.auth
        ],
        "authentication_results": ar,
    }


def run(args: Any) -> int:
    settings = config.load(args.config)
    message = Path(args.message).read_bytes()
    out = asyncio.run(
        explain(settings, message, args.client_ip, args.helo, args.mail_from, args.rcpt)
    )
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"client {out['client_ip']}{' (trusted: sender checks skipped)' if out['trusted'] else ''}"
    )
    for s in out["stages"]:
        print(f"  {s['stage']:<28} {s['action']:<10} {', '.join(s['symbols']) or '-'}")
    print("results:")
    for r in out["results"]:
        extra = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("method", "result"))
        print(f"  {r['method']}={r['result']} {extra}")
    print(
        f"action: {out['action']}"
        + (f" ({out['deciding_symbol']})" if out["deciding_symbol"] else "")
    )
    print(f"reply:  {out['reply']}")
    print(out["authentication_results"])
    return 0
