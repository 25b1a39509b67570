"""The backend's side of one client transaction, beyond command-for-command relay:
a recipient that rewriting turned into several (an alias), a transaction opened
again under another sender or for other recipients (SRS, quarantine by
redirection), and LMTP's reply per recipient merged into the one SMTP reply the
client can get. The session (smtp/session.py) decides when; this module knows
how, and what the client may be told.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway import dsn, replies
from gateway.address import Address
from gateway.forward.backend import ClientInfo, Link, Transaction
from gateway.forward.client import BackendError, SmtpReply
from gateway.replies import Reply


@dataclass(slots=True)
class FanOut:
    """What one client RCPT came to at the backend."""

    # For the client: a member's reply relayed, ALIAS_ACCEPTED for an alias some of
    # whose members accepted, TOO_MANY_RECIPIENTS; None when the backend was lost.
    reply: SmtpReply | Reply | None = None
    results: list[SmtpReply] = field(default_factory=list)  # per target asked
    refused: list[str] = field(default_factory=list)  # "<target> reply" of those refused
    error: BackendError | None = None
    over_limit: bool = False  # the transaction's recipient limit ended it

    @property
    def alias_accepted(self) -> bool:
        return self.reply is replies.ALIAS_ACCEPTED


async def fan_out(
    txn: Transaction,
    original: Address,
    targets: Sequence[Address],
    params: list[str],
    *,
    held: list[Address],
    held_params: dict[Address, list[str]],
    max_recipients: int,
) -> FanOut:
    """RCPT each target at the backend; one reply for the client.

    `held` (the backend's recipients so far) and `held_params` (their DSN
    parameters, for a transaction opened again) grow with each target the backend
    accepts. A target already held is not asked again (two aliases meeting at one
    mailbox: the message is delivered once). With several targets, any 4xx
    defers the whole recipient (the client retries; a member that accepted may
    then get the message twice, which is better than losing it for the one that
    deferred); otherwise any acceptance accepts it, and a member's permanent
    refusal is only logged. An alias's targets carry the client's address as
    ORCPT (RFC 3461 4.2) unless the client gave one.
    """
    out = FanOut()
    single = len(targets) == 1 and targets[0] == original
    if not single and not any(p[:6] == "ORCPT=" for p in params):
        orcpt = dsn.orcpt_for(str(original))
        if orcpt is not None:
            params = [*params, orcpt]
    accepted = 0
    for t in targets:
        if t in held:
            accepted += 1
            continue
        if len(held) >= max_recipients:
            out.reply, out.over_limit = replies.TOO_MANY_RECIPIENTS, True
            return out
        try:
            r = await txn.rcpt(str(t), params)
        except BackendError as e:
            out.error = e
            return out
        out.results.append(r)
        if r.ok:
            held.append(t)
            accepted += 1
            if params:
                held_params[t] = params
        else:
            out.refused.append(f"<{t}> {r}")
    results = out.results
    temp = next((r for r in results if 400 <= r.code < 500), None)
    if len(targets) == 1 and results:
        out.reply = results[0]
    elif temp is not None:
        out.reply = temp
    elif accepted:
        out.reply = replies.ALIAS_ACCEPTED
    else:
        out.reply = results[0]
    return out


async def reopen(
    link: Link,
    old: Transaction | None,
    client: ClientInfo,
    sender: Address,
    params: list[str],
    recipients: Sequence[Address],
    rcpt_params: dict[Address, list[str]],
) -> Transaction | str:
    """Abandon the backend transaction (RSET) and open it again with this sender and
    these recipients: the new transaction, or why it could not be opened. The
    caller must then defer the rest of the client's transaction: the client was
    told 250 for recipients the backend no longer holds, so only a retry of the
    whole transaction is safe (a 5xx would lose their mail)."""
    if old is not None:
        await old.abort()
    try:
        reply, txn = await link.begin(client, str(sender), params)
        if txn is None:
            return f"MAIL: {reply}"
        for rcpt in recipients:
            r = await txn.rcpt(str(rcpt), rcpt_params.get(rcpt, []))
            if not r.ok:
                await txn.abort()
                return f"RCPT {rcpt}: {r}"
    except BackendError as e:
        return str(e)
    return txn


def combine_lmtp(results: list[SmtpReply], recipients: list[Address]) -> SmtpReply | Reply:
    """LMTP gives one reply per recipient (in RCPT order); SMTP can only give one.

    All of one class: relay the first. Any temporary failure among them: a 4xx,
    so the client retries every recipient; duplicates are possible, loss is not.
    Only deliveries and permanent refusals: a 4xx would make every retry deliver
    again to the same recipients and be refused again by the others, for the
    days the client keeps retrying. So a 5xx that names the refused recipients:
    the sender gets a bounce saying who did not get the message, and those who
    did get it get it once.
    """
    if len(results) == 1 or len({r.code // 100 for r in results}) == 1:
        return results[0]
    if any(400 <= r.code < 500 for r in results) or len(results) != len(recipients):
        return replies.BACKEND_PARTIAL
    refused = [(str(a), str(r)) for a, r in zip(recipients, results, strict=True) if r.code >= 500]
    return replies.partial_refusal(len(results) - len(refused), refused)
