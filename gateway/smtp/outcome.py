"""How a transaction ended, counted and logged once: the metrics by outcome and
reason, its duration, and the one log line an operator searches for a message
(sender, recipients, size, what the backend said, what rewriting changed).

Outcomes are a closed set: delivered, rejected, tempfailed, aborted.
"""

from __future__ import annotations

import time

from gateway import logs, metrics
from gateway.context import Context
from gateway.smtp.transaction import Transaction
from gateway.vocab import Action

# The duration series by outcome (a closed set), looked up once.
_SECONDS: dict[str, metrics.BufferedHistogram] = {}


def outcome_of(action: Action) -> str:
    if action is Action.REJECT:
        return "rejected"
    if action is Action.TEMPFAIL:
        return "tempfailed"
    return "delivered"


def record(
    session_id: str,
    number: int,
    ctx: Context,
    t: Transaction,
    action: Action,
    reason: str,
    *,
    size: int = 0,
    aborted: bool = False,
    **extra: object,
) -> str:
    """Count and log transaction `number` of the session; returns its outcome."""
    outcome = "aborted" if aborted else outcome_of(action)
    metrics.child(metrics.TRANSACTIONS, outcome, reason or "none").inc()
    # A transaction that never got to MAIL (a refused MAIL) took no time of its own.
    took = time.monotonic() - t.started if t.started else 0.0
    if t.started:
        seconds = _SECONDS.get(outcome)
        if seconds is None:
            seconds = _SECONDS[outcome] = metrics.child(metrics.TRANSACTION_SECONDS, outcome)
        seconds.observe(took)
    if not logs.enabled():
        return outcome
    mail_from = ctx.mail_from
    if ctx.rewritten:
        extra["rewritten"] = {
            str(orig): [str(x) for x in targets] for orig, targets in ctx.rewritten
        }
    sender = t.backend_sender
    if sender is not None and mail_from is not None and sender != mail_from:
        extra["backend_sender"] = str(sender)
    if t.rcpt_refused:
        extra["refused"] = t.rcpt_refused
    if ctx.facts.scans:
        # What the content scanners said (a virus's signature name): here, never in
        # the reply or a metric label.
        extra["scans"] = {
            f.scanner: {"verdict": f.verdict, **({"detail": f.detail} if f.detail else {})}
            for f in ctx.facts.scans
        }
    logs.event(
        "transaction",
        session=session_id,
        txn=number,
        client=ctx.client_ip,
        helo=ctx.helo,
        tls=ctx.tls_version,
        tls_cipher=ctx.tls_cipher,
        mail_from=str(mail_from or ""),
        rcpts=len(ctx.recipients),
        size=size,
        outcome=outcome,
        reason=reason,
        duration_ms=round(took * 1000, 1),
        **extra,
    )
    return outcome
