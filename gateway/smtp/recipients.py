"""What a client's recipient becomes before the backend sees it: the SRS address
reversed (a bounce to a forwarded message) and virtual aliases expanded, with the
refusals that can come of it (an invalid or forged SRS address, counted per client;
an alias loop; a rewrite that would make a relay trick). Relay control has judged
the canonical address already; this decides the targets."""

from __future__ import annotations

from gateway import logs, metrics, replies
from gateway.address import Address
from gateway.checks.relay import DENIED, relay_trick
from gateway.replies import Reply
from gateway.rewrite.engine import AliasLoop, Rewriter, SrsError
from gateway.smtp.guard import FailureLimit
from gateway.vocab import Action


def expand(
    rewriter: Rewriter,
    original: Address,
    addr: Address,
    *,
    client_ip: str,
    bounce: bool,
    srs_failures: FailureLimit,
    session_id: str,
) -> Reply | list[Address]:
    """SRS reverse then virtual aliases: the targets, or the refusal to send (counted
    and logged). `bounce`: the transaction's sender is <>, to which SRS addresses
    are answered (RFC 5321 4.5.5 and the SRS convention)."""
    guard = srs_failures
    try:
        if guard.blocked(client_ip) and rewriter.is_srs(addr):
            raise SrsError("too many invalid SRS addresses from this client")
        targets = rewriter.expand(rewriter.srs_reverse(addr, bounce))
    except SrsError as e:
        reply: Reply = replies.SRS_LIMITED if guard.blocked(client_ip) else replies.SRS_INVALID
        why = str(e)
        if reply is replies.SRS_INVALID:
            guard.failed(client_ip)
    except AliasLoop as e:
        reply, why = replies.ALIAS_LOOP, str(e)
    else:
        if not any(relay_trick(t) for t in targets):
            return targets
        reply, why = replies.for_action(Action.REJECT, DENIED), "rewrite produced a relay trick"
    metrics.child(metrics.RECIPIENTS, "rejected", reply.reason).inc()
    logs.event("rcpt_refused", session=session_id, rcpt=str(original), reason=reply.reason,
               reply=str(reply), error=why)  # fmt: skip
    return reply
