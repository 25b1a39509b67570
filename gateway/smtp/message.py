"""DATA: the message read within its bounds, the checks at DATA, our header
fields composed in front of it (headers.compose), quarantine by redirection, and
the backend's verdict relayed (with LMTP, its replies merged into one)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway import headers, logs, metrics, replies
from gateway.address import parse_path
from gateway.forward import relay
from gateway.forward.backend import client_reply
from gateway.forward.client import BackendError
from gateway.pipeline.policy import Policy
from gateway.replies import Reply
from gateway.smtp import protocol
from gateway.smtp.data import THREAD_BYTES, DataRefused, check_header_section, read_message
from gateway.smtp.envelope import rebegin
from gateway.smtp.protocol import SessionEnd
from gateway.vocab import Action, Stage, action_of_code
from gateway.wire import unstuff_pieces

if TYPE_CHECKING:
    from gateway.smtp.session import Session

# Fields a receiving MTA adds at delivery, which a filter after it may trust: never
# the sender's to write.
_MTA_FIELDS = ("X-Original-To",)


async def data(s: Session, arg: str) -> None:
    if arg:
        s.send(replies.SYNTAX_ARGS)
        return
    refused = protocol.out_of_sequence(s.phase, b"DATA")
    if refused is replies.NEED_MAIL:
        s.send(refused)
        return
    if s.t.broken is not None:
        s.send(s.t.broken)
        return
    if refused is not None or s.t.backend is None:
        # No recipient accepted: none given yet, or every one refused.
        s.send(replies.NO_VALID_RECIPIENTS if s.t.rcpt_tried else replies.NEED_RCPT)
        return
    s.send(replies.START_DATA)
    s.flush()
    max_size = s.svc.max_size
    s.stream.set_high_water(max_size + 65536)
    s.stream.set_deadline(s.limits.data_timeout)
    try:
        # Charged to the process's memory budget as it arrives (smtp/memory.py);
        # end_txn gives it back.
        wire = await read_message(s.stream, s.rx, max_size, s.limits.bare_linefeed, s.room)
        check_header_section(wire, s.limits)
    except TimeoutError:
        s.send(replies.TIMEOUT)
        await s.end_txn(Action.TEMPFAIL, "timeout", abort=True)
        raise SessionEnd from None
    except DataRefused as e:
        s.send(e.reply)
        action = Action.TEMPFAIL if e.reply.temporary else Action.REJECT
        await s.end_txn(action, e.reply.reason, abort=True)
        return
    finally:
        s.stream.set_high_water(256 * 1024)
    size = len(wire)
    metrics.child(metrics.MESSAGE_SIZE).observe(size)
    s.ctx.wire = wire
    if size > THREAD_BYTES and s.view.has_checks(Stage.DATA):
        # The checks read the message unstuffed: a copy of it made on the loop
        # would hold every other session for tens of milliseconds.
        s.ctx.unstuffed(await asyncio.to_thread(unstuff_pieces, wire))
    verdict = await s.svc.runner.run(Stage.DATA, s.ctx, s.view)
    if verdict.refuses:
        s.send(s.policy_reply(verdict, Stage.DATA), policy=True)
        await s.end_txn(verdict.action, verdict.symbol, abort=True, size=size)
        return
    rewriter = s.view.policy.rewriter
    extra = b""
    if rewriter.active:
        # After every check: DMARC judged the From the client sent.
        wire = rewriter.headers(wire)
        extra = _original_recipient(s)
    policy = s.view.policy
    recipients = s.ctx.recipients
    verdicts = headers.Verdicts(
        s.authserv_id,
        s.ctx.auth,
        policy.tag.header,
        s.ctx.tags,
        (policy.quarantine.header, [str(r) for r in recipients]) if s.ctx.quarantine else None,
        s.ctx.facts.rspamd,
    )
    wire, prefix, forged = headers.compose(
        wire, _received(s), _our_fields(s, policy), verdicts, extra
    )
    if forged:
        logs.event("forged_ar_removed", session=s.id, count=forged)
    n_rcpts = len(recipients)
    if s.ctx.quarantine and policy.quarantine.mode == "redirect":
        assert policy.quarantine.recipient is not None  # the policy model requires it
        refused = await _redirect(s, policy.quarantine.recipient)
        if refused is not None:
            s.send(refused)
            await s.end_txn(Action.TEMPFAIL, "quarantine_failed", abort=True)
            return
        n_rcpts = 1
    txn = s.t.backend
    assert txn is not None
    try:
        results = await txn.data(wire, n_rcpts, prefix)
    except BackendError as e:
        s.send(client_reply(e))
        await s.end_txn(Action.TEMPFAIL, "backend_lost", abort=True, size=size, error=str(e))
        return
    final = relay.combine_lmtp(results, s.ctx.recipients)
    if isinstance(final, Reply):
        s.send_raw(final.wire())  # the backend's verdict: not a client error
    else:
        s.relay(final)
    code = final.code
    action = action_of_code(code)
    await s.end_txn(action, "backend", abort=False, size=size, backend=str(final))


def _received(s: Session) -> bytes:
    tls_desc = None
    # RFC 6531 3.7.3: a transaction under SMTPUTF8 is received "with UTF8SMTP(S)".
    proto = "UTF8SMTP" if s.t.utf8 else "ESMTP" if s.esmtp else "SMTP"
    if s.ctx.tls_version:
        proto += "S"
        tls_desc = (
            f"version={s.ctx.tls_version.replace('v', '').replace('.', '_')} "
            f"cipher={s.ctx.tls_cipher}"
        )
    rcpts = s.ctx.recipients
    return headers.received(
        helo=s.ctx.helo,
        client_ip=s.ctx.client_ip,
        hostname=s.settings.hostname,
        proto=proto,
        session_id=s.id,
        tls=tls_desc,
        recipient=str(rcpts[0]) if len(rcpts) == 1 else None,
    )


def _our_fields(s: Session, policy: Policy) -> headers.OurFields:
    names = [policy.tag.header, policy.quarantine.header, *_MTA_FIELDS]
    if policy.rewrite.original_recipient_header:
        names.append(policy.rewrite.original_recipient_header)
    if policy.checks.rspamd.enabled and policy.checks.rspamd.spam_headers:
        names.extend(headers.SPAM_FIELDS)
    return headers.our_fields(s.authserv_id, s.settings.hostname, tuple(names))


def _original_recipient(s: Session) -> bytes:
    """X-Original-To (or the configured name) for a single rewritten recipient;
    never with several, where it would show each recipient the others (Bcc)."""
    name = s.view.policy.rewrite.original_recipient_header
    rw = s.ctx.rewritten
    if name is None or len(rw) != 1 or s.t.rcpt_tried != 1:
        return b""
    return f"{name}: {rw[0][0]}\r\n".encode()


async def _redirect(s: Session, recipient: str) -> Reply | None:
    """Quarantine by redirection: abandon the original recipients at the backend
    and open the transaction again for the quarantine mailbox only."""
    sender = s.t.backend_sender
    assert sender is not None  # DATA comes after the backend took MAIL
    refused = await rebegin(s, sender, [parse_path(f"<{recipient}>")])
    if refused is None:
        logs.event(
            "quarantined",
            session=s.id,
            to=recipient,
            original=[str(a) for a in s.ctx.recipients],
        )
    return refused
