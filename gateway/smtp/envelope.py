"""The envelope: HELO/EHLO, MAIL and RCPT. The checks of each stage, the
sender's and the recipients' rewriting, the memory budget a MAIL is admitted to,
and the backend transaction opened, fanned out to and, when SRS changes the
sender, opened again (forward/relay.py knows how)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway import logs, metrics, replies
from gateway.address import Address
from gateway.forward import relay
from gateway.forward.backend import BackendUnavailable, ClientInfo, client_reply
from gateway.replies import Reply
from gateway.smtp import protocol, recipients
from gateway.smtp.outcome import outcome_of
from gateway.smtp.transaction import Transaction
from gateway.vocab import Action, Stage, action_of_code

if TYPE_CHECKING:
    from gateway.smtp.session import Session

# A transaction's log line names at most this many recipients the backend refused,
# each cut to this length: the count of recipients is the client's to choose.
_LOGGED_REFUSALS = 10
_LOGGED_REFUSAL_LEN = 300


async def ehlo(s: Session, arg: str) -> None:
    await _helo(s, arg, esmtp=True)


async def helo(s: Session, arg: str) -> None:
    await _helo(s, arg, esmtp=False)


async def _helo(s: Session, arg: str, *, esmtp: bool) -> None:
    if not arg:
        s.send(replies.SYNTAX_HELO)
        return
    s.note_junk()  # as Postfix: a greeting repeated in a loop is a way to hold a slot
    await s.abort_txn("helo")
    s.ctx.helo = arg.split(" ", 1)[0][:255]
    s.esmtp = esmtp
    if s.svc.runner.has_checks(Stage.HELO):
        verdict = await s.svc.runner.run(Stage.HELO, s.ctx)
        if verdict.refuses:
            s.send(s.policy_reply(verdict, Stage.HELO), policy=True)
            return
    host = s.settings.hostname
    if not esmtp:
        s.send_raw(f"250 {host}\r\n".encode())
        return
    caps = s.listener.ehlo_tls if s.stream.tls_object else s.listener.ehlo_plain
    s.send_raw(f"250-{host}\r\n".encode() + caps)


async def mail(s: Session, arg: str) -> None:
    refused = protocol.out_of_sequence(s.phase, b"MAIL")
    if refused is None and s.t.backend is not None:
        refused = replies.NESTED_MAIL
    if refused is replies.NEED_HELO:
        s.send(refused)
        return
    if s.listener.cfg.require_tls and s.stream.tls_object is None:
        s.send(replies.TLS_REQUIRED)
        return
    if refused is not None:
        s.send(refused)
        return
    if arg[:5].upper() != "FROM:":
        s.send(replies.SYNTAX_MAIL)
        return
    parsed = protocol.path_and_params(arg[5:].lstrip(" "), sender=True, utf8_mail=False)
    if isinstance(parsed, Reply):
        s.send(parsed)
        return
    addr, params = parsed
    mail = protocol.mail_parameters(
        params,
        max_size=s.svc.max_size,
        tls=s.stream.tls_object is not None,
        requiretls=s.listener.requiretls,
    )
    if isinstance(mail, Reply):
        s.send(mail)
        return
    declared, fwd = mail.declared, mail.forward
    # The policy this transaction runs under to its end (a reload meanwhile
    # applies from the next MAIL): its checks, actions, rewriter and headers.
    s.t = Transaction(started=time.monotonic(), view=s.svc.runner.view)
    s.ctx.new_transaction()
    s.ctx.mail_from = addr  # a refused MAIL's log line names its sender too
    # The process's memory budget (smtp/memory.py): a MAIL whose SIZE= does not
    # fit in what is left, or any while nothing is, waits its turn for room (up
    # to limits.data_memory_wait), before the client sends a byte; admitted, its
    # SIZE= is pledged to it until its bytes come (or the wait's time passes).
    if not s.room.admit(declared) and not await _wait_for_memory(s, declared):
        s.send(replies.NO_MEMORY)
        s.txn_outcome(Action.TEMPFAIL, replies.NO_MEMORY.reason)
        s.ctx.new_transaction()
        return
    s.t.utf8 = mail.utf8
    if s.view.has_checks(Stage.MAIL):
        verdict = await s.svc.runner.run(Stage.MAIL, s.ctx, s.view)
        if verdict.refuses:
            s.send(s.policy_reply(verdict, Stage.MAIL), policy=True)
            s.txn_outcome(verdict.action, verdict.symbol)
            s.no_transaction()
            return
    info = ClientInfo(
        s.ctx.client_ip,
        s.ctx.client_port,
        s.ctx.helo,
        s.esmtp,
        s.stream.tls_object is not None,
    )
    # Sender rewriting comes after the MAIL checks (SPF judged what the client
    # sent); ctx.mail_from stays the original for DMARC and the logs.
    rewriter = s.view.policy.rewriter
    s.t.backend_sender = rewriter.sender(addr) if rewriter.active else addr
    try:
        reply, txn = await s.link.begin(info, str(s.t.backend_sender), fwd)
    except BackendUnavailable as e:
        refused = client_reply(e)
        s.send(refused)
        s.txn_outcome(Action.TEMPFAIL, refused.reason, error=str(e))
        s.no_transaction()
        return
    if txn is None:
        s.relay(reply)
        s.txn_outcome(action_of_code(reply.code), "backend", backend=str(reply))
        s.no_transaction()
        return
    s.t.backend = txn
    s.t.client, s.t.mail_params = info, fwd
    s.relay(reply)


async def _wait_for_memory(s: Session, size: int) -> bool:
    """Wait in line for room in the memory budget. The session counts as idle
    meanwhile (no transaction yet), so a drain ends it at once with 421."""
    memory = s.svc.memory
    if not memory.wait or s.svc.draining:
        return False
    s.idle = True
    try:
        admitted = await s.room.wait_admit(size)
    finally:
        s.idle = False
    metrics.child(metrics.MESSAGE_MEMORY_WAITS, "admitted" if admitted else "timeout").inc()
    return admitted


async def rcpt(s: Session, arg: str) -> None:
    refused = protocol.out_of_sequence(s.phase, b"RCPT")
    if refused is not None:
        s.send(refused)
        return
    if arg[:3].upper() != "TO:":
        s.send(replies.SYNTAX_RCPT)
        return
    utf8 = s.t.utf8
    parsed = protocol.path_and_params(arg[3:].lstrip(" "), sender=False, utf8_mail=utf8)
    if isinstance(parsed, Reply):
        s.send(parsed)
        return
    addr, params = parsed
    dsn_params = protocol.rcpt_parameters(params, utf8=utf8)
    if isinstance(dsn_params, Reply):
        s.send(dsn_params)
        return
    if len(s.ctx.recipients) >= s.limits.max_recipients:
        s.send(replies.TOO_MANY_RECIPIENTS)
        metrics.child(metrics.RECIPIENTS, "tempfailed", "too_many_recipients").inc()
        return
    s.t.rcpt_tried += 1
    rewriter = s.view.policy.rewriter
    original = addr
    if rewriter.active:
        # Relay control and the RCPT checks judge the canonical address.
        addr = rewriter.canonical_recipient(addr)
    s.ctx.rcpt = addr
    verdict = await s.svc.runner.run(Stage.RCPT, s.ctx, s.view)
    if verdict.refuses:
        reply = s.policy_reply(verdict, Stage.RCPT)
        s.send(reply, policy=True)
        metrics.child(metrics.RECIPIENTS, outcome_of(verdict.action), verdict.symbol).inc()
        logs.event(
            "rcpt_refused",
            session=s.id,
            rcpt=str(original),
            reason=verdict.symbol,
            reply=str(reply),
        )
        return
    if s.t.broken is not None or s.t.backend is None:
        s.send(s.t.broken or replies.BACKEND_LOST)
        return
    targets = [addr]
    if rewriter.active:
        sender = s.ctx.mail_from
        expanded = recipients.expand(
            rewriter,
            original,
            addr,
            client_ip=s.ctx.client_ip,
            bounce=sender is not None and sender.is_null,
            srs_failures=s.svc.srs_failures,
            session_id=s.id,
        )
        if isinstance(expanded, Reply):
            s.send(expanded)
            return
        targets = expanded
        if rewriter.srs is not None and not await _srs_if_forwarding(s, targets):
            return
    await _backend_rcpts(s, original, targets, dsn_params)


async def _srs_if_forwarding(s: Session, targets: list[Address]) -> bool:
    """A recipient that leaves our domains gets the SRS sender: the backend
    transaction is opened again with it (earlier recipients replayed)."""
    rewriter = s.view.policy.rewriter
    sender = s.t.backend_sender
    assert sender is not None  # RCPT comes after the backend took MAIL
    if sender.is_null or all(s.svc.is_local(t) for t in targets):
        return True
    srs_sender = rewriter.srs_forward(sender)
    if srs_sender == sender:
        return True
    refused = await rebegin(s, srs_sender, list(s.ctx.recipients))
    if refused is not None:
        s.send(refused)
        return False
    logs.event("srs_forward", session=s.id, sender=str(sender), srs=str(srs_sender))
    return True


async def _backend_rcpts(
    s: Session, original: Address, targets: list[Address], params: list[str]
) -> None:
    """RCPT the (rewritten) addresses at the backend (forward/relay.py), then tell
    the client, count and log what came of it."""
    assert s.t.backend is not None
    out = await relay.fan_out(
        s.t.backend,
        original,
        targets,
        params,
        held=s.ctx.recipients,
        held_params=s.t.rcpt_params,
        max_recipients=s.limits.max_recipients,
    )
    if out.refused:
        room = max(_LOGGED_REFUSALS - len(s.t.rcpt_refused), 0)
        s.t.rcpt_refused += [r[:_LOGGED_REFUSAL_LEN] for r in out.refused[:room]]
    if out.error is not None:
        await s.backend_failed(out.error)
        return
    final = out.reply
    assert final is not None
    if out.over_limit:
        s.send(replies.TOO_MANY_RECIPIENTS)
        metrics.child(metrics.RECIPIENTS, "tempfailed", "too_many_recipients").inc()
        return
    if targets != [original]:
        s.ctx.rewritten.append((original, tuple(targets)))
    if isinstance(final, Reply):  # an alias some of whose members accepted
        metrics.child(metrics.RECIPIENTS, "accepted", "backend").inc()
        s.send(final)
        refused = [str(r) for r in out.results if not r.ok]
        if refused:
            logs.event("alias_members_refused", session=s.id, rcpt=str(original),
                       refused=refused)  # fmt: skip
        return
    outcome = "accepted" if final.ok else outcome_of(action_of_code(final.code))
    metrics.child(metrics.RECIPIENTS, outcome, "backend").inc()
    s.relay(final)
    if final.code >= 500:
        # The backend refused a recipient (unknown user): an error of this client's,
        # as the backend itself would count it. The backend's own limit cannot
        # hold (each client session gets a fresh backend session), so max_errors
        # must: else a client guesses mailboxes past it (the gateway's count).
        s.count_error("backend_refused")


async def rebegin(s: Session, sender: Address, recipients: list[Address]) -> Reply | None:
    """Open the backend transaction again with this sender and these recipients
    (forward/relay.py); if that fails, this and every later command of the
    transaction gets a 4xx."""
    old, s.t.backend = s.t.backend, None
    assert s.t.client is not None
    txn = await relay.reopen(
        s.link, old, s.t.client, sender, s.t.mail_params, recipients,
        s.t.rcpt_params,
    )  # fmt: skip
    if not isinstance(txn, str):
        s.t.backend = txn
        s.t.backend_sender = sender
        return None
    logs.failure("backend_reopen_failed", session=s.id, error=txn)
    s.t.broken = replies.BACKEND_REOPEN_FAILED
    return replies.BACKEND_REOPEN_FAILED
