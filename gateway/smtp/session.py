"""The SMTP server side: one coroutine per connection, command by command.

The session holds what a connection knows (its client, its transaction, its
output) and runs the loop: the stream's bytes, framed into a command by
smtp/protocol.py, handed to the verb's handler. The handlers live by job: the start of a session
and STARTTLS in smtp/opening.py, HELO, MAIL and RCPT in smtp/envelope.py, DATA in
smtp/message.py; the small ones here. The invariant they keep: the client hears
250 for DATA only after the backend said 250; any backend failure becomes a 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from gateway import logs, metrics, replies
from gateway.context import Context
from gateway.forward.backend import client_reply
from gateway.forward.client import BackendError, SmtpReply
from gateway.net import plain_ip
from gateway.pipeline.runner import View
from gateway.replies import Reply
from gateway.smtp import envelope, message, opening, protocol
from gateway.smtp.memory import Reservation
from gateway.smtp.outcome import record
from gateway.smtp.protocol import LAST_IN_GROUP, SessionEnd
from gateway.smtp.services import ListenerState, Services, new_session_id
from gateway.smtp.transaction import Transaction
from gateway.stream import Stream, StreamClosed
from gateway.vocab import Action, Stage, Verdict

log = logging.getLogger("gateway.smtp")


class Session:
    """One client connection."""

    def __init__(self, svc: Services, listener: ListenerState, stream: Stream) -> None:
        self.svc = svc
        self.settings = svc.settings
        self.limits = svc.settings.limits
        self.authserv_id = svc.settings.authserv_id or svc.settings.hostname
        self.listener = listener
        self.stream = stream
        # The client's bytes, framed into commands and messages (sans-I/O).
        self.rx = protocol.Receiver(stream.buffer)
        self.id = new_session_id()
        self.started = time.monotonic()
        self.out: list[bytes] = []
        self.errors = 0
        self.junk = 0  # NOOP/RSET/VRFY/HELP since the last transaction
        self.esmtp = False
        self.t = Transaction()  # the current transaction's state (smtp/transaction.py)
        # This client session's own way to the backend (forward/link.py).
        self.link = svc.backend.link()
        # The message's share of the memory budget, from DATA to the transaction's end.
        self.room = Reservation(svc.memory)
        self.txn_count = 0
        self.sync = False  # enforce_sync applies to this client (set once it is known)
        self.idle = False
        self.task: asyncio.Task[None] | None = None
        peer = stream.peername or ("0.0.0.0", 0)
        self.ctx = Context(
            session_id=self.id,
            client_ip=plain_ip(str(peer[0])),
            client_port=int(peer[1]),
            listener=listener.cfg.name,
        )

    # -- output -----------------------------------------------------------------
    def send(self, r: Reply, *, policy: bool = False) -> None:
        """Queue a reply. A 5xx counts against limits.max_errors, a policy refusal
        too (as Postfix counts its rejections); only the client's own mistakes are
        protocol errors in the metrics (refusals_total counts the policy's)."""
        self.out.append(r.wire())
        if r.code >= 500 and r.reason != "backend":
            if policy:
                self.errors += 1
            else:
                self.count_error(r.reason or "other")

    def send_raw(self, data: bytes) -> None:
        self.out.append(data)

    def relay(self, reply: SmtpReply) -> None:
        self.out.append(replies.backend_wire(reply.code, tuple(reply.lines)))

    def flush(self) -> None:
        if self.out:
            self.stream.write(b"".join(self.out))
            self.out.clear()

    def count_error(self, reason: str) -> None:
        self.errors += 1
        metrics.child(metrics.COMMAND_ERRORS, reason).inc()

    # -- main loop ----------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.listener.cfg
        try:
            if not await opening.open_session(self):
                return
            # The command loop is here, not in a coroutine of its own: every wait of
            # the session resumes through each frame of its stack.
            limits = self.limits
            line_limit = limits.max_command_line
            stream = self.stream
            rx = self.rx
            while True:
                if self.errors >= limits.max_errors:
                    self.send(replies.TOO_MANY_ERRORS)
                    raise SessionEnd
                self.idle = self.t.backend is None
                if self.idle and self.svc.draining:
                    self.send(replies.SHUTTING_DOWN)
                    raise SessionEnd
                self.flush()
                stream.set_deadline(limits.command_timeout)
                if stream.write_paused:
                    # The client pipelines without reading our replies: stop reading
                    # until it does, so its replies cannot pile up in our memory.
                    try:
                        await asyncio.wait_for(stream.drain(), limits.command_timeout)
                    except TimeoutError:
                        stream.abort()
                        raise SessionEnd from None
                try:
                    cmd = rx.next_command(line_limit)
                    while cmd is None:
                        await stream.more()
                        cmd = rx.next_command(line_limit)
                except TimeoutError:
                    self.send(replies.TIMEOUT)
                    raise SessionEnd from None
                finally:
                    self.idle = False
                if isinstance(cmd, Reply):  # a line too long, or with control characters
                    self.send(cmd)
                    continue
                verb = cmd.verb
                handler = _COMMANDS.get(verb)
                if self.sync and (verb in LAST_IN_GROUP or not self.esmtp) and stream.pending:
                    self.out_of_sync(replies.SYNC_ERROR, verb.decode("ascii", "replace"))
                if handler is None:
                    self.send(replies.SYNTAX_UNRECOGNIZED)
                    continue
                await handler(self, cmd.arg)
        except asyncio.CancelledError:
            # Drain: tell the client, so it retries elsewhere, and undo at the backend.
            self.out.clear()
            self.send(replies.SHUTTING_DOWN)
            self.flush()
            await self.abort_txn("shutdown")
            raise
        except (StreamClosed, ConnectionError):
            await self.abort_txn("client_lost")
        except SessionEnd:
            self.flush()
            await self.abort_txn("closed")
        except Exception:
            log.exception("session %s crashed", self.id)
            self.out.clear()
            self.send(replies.LOCAL_ERROR)
            self.flush()
            await self.abort_txn("local_error")
        finally:
            self.stream.close()
            await self.link.end()  # the backend session ends with its client's (QUIT)
            for release in self.ctx.on_close:
                release()
            metrics.child(metrics.TLS_SESSIONS, cfg.name, self.ctx.tls_version or "none").inc()
            _SESSION_SECONDS.observe(time.monotonic() - self.started)
            if logs.enabled():
                logs.event(
                    "disconnect",
                    session=self.id,
                    listener=cfg.name,
                    client=self.ctx.client_ip,
                    transactions=self.txn_count,
                )

    def out_of_sync(self, reply: Reply, after: str) -> None:
        """A client that does not wait for our replies is a bulk mailer's shortcut, and
        a smuggled second message looks the same (its DATA followed by the content
        without a 354): one clear reply, then close."""
        self.send(reply)
        logs.event(
            "sync_error",
            session=self.id,
            client=self.ctx.client_ip,
            after=after or "connect",
            pending=self.stream.pending,
        )
        raise SessionEnd

    # -- commands ------------------------------------------------------------------

    @property
    def view(self) -> View:
        """The policy the current transaction runs under (taken at its MAIL), or the
        current one outside a transaction."""
        return self.t.view or self.svc.runner.view

    @property
    def phase(self) -> protocol.Phase:
        ctx = self.ctx
        return protocol.phase_of(ctx.helo, ctx.mail_from, len(ctx.recipients))

    def no_transaction(self) -> None:
        """MAIL admitted, then refused (a check, the backend): what it holds goes back."""
        self.ctx.new_transaction()
        self.room.release()

    def note_junk(self) -> None:
        """NOOP, RSET, VRFY, HELP, EHLO/HELO: harmless one by one, a way to hold a slot and burn
        CPU in a flood. Past `max_junk_commands` in a row without a transaction, each
        one counts as an error, so the flood ends with 421 4.7.0 (Postfix's
        smtpd_junk_command_limit)."""
        self.junk += 1
        if self.junk > self.limits.max_junk_commands:
            self.count_error("junk_commands")

    async def cmd_rset(self, arg: str) -> None:
        self.note_junk()
        await self.abort_txn("rset")
        self.send(replies.RESET_OK)

    async def cmd_noop(self, arg: str) -> None:
        self.note_junk()
        self.send(replies.NOOP_OK)

    async def cmd_quit(self, arg: str) -> None:
        self.send(replies.BYE)
        raise SessionEnd

    async def cmd_vrfy(self, arg: str) -> None:
        self.note_junk()
        self.send(replies.VRFY_CANNOT if arg else replies.SYNTAX_ARGS)

    async def cmd_expn(self, arg: str) -> None:
        self.send(replies.NOT_IMPLEMENTED)

    async def cmd_help(self, arg: str) -> None:
        self.note_junk()
        self.send(replies.HELP)

    async def cmd_auth(self, arg: str) -> None:
        self.send(replies.AUTH_NOT_OFFERED)

    async def cmd_bdat(self, arg: str) -> None:
        self.send(replies.BDAT_NOT_OFFERED)

    async def cmd_xcmd(self, arg: str) -> None:
        self.send(replies.XCOMMAND_REFUSED)

    def policy_reply(self, verdict: Verdict, stage: Stage) -> Reply:
        """The reply to a refusing verdict, counted: every policy refusal at every
        stage passes here once."""
        metrics.child(metrics.REFUSALS, stage.value, verdict.action.value, verdict.symbol).inc()
        reply = replies.for_action(
            verdict.action, verdict.symbol, self.ctx.details.get(verdict.symbol)
        )
        if stage is Stage.CONNECT:
            # RFC 5321 3.1 / 4.3.2: a greeting refusal is 554, a temporary one 421.
            code = 554 if reply.code >= 500 else 421
            enhanced = reply.enhanced if reply.code >= 500 else "4.7.0"
            reply = Reply(code, enhanced, reply.text, reply.reason)
        return reply

    async def backend_failed(self, e: BackendError) -> None:
        """The backend dropped mid-transaction: this transaction can only tempfail now."""
        reply = client_reply(e)
        self.t.broken = reply
        self.send(reply)
        logs.failure("backend_error", session=self.id, error=str(e))
        if self.t.backend is not None:
            await self.t.backend.abort()
            self.t.backend = None

    async def abort_txn(self, why: str) -> None:
        if self.ctx.mail_from is None and self.t.backend is None:
            return
        if self.t.rcpt_refused and not self.ctx.recipients and why != "shutdown":
            # Every recipient was refused by the backend: that, not the client's QUIT
            # or RSET after it, is how the transaction ended.
            first = self.t.rcpt_refused[0]
            code = first[first.index("> ") + 2 :][:1]
            action = Action.TEMPFAIL if code == "4" else Action.REJECT
            await self.end_txn(action, "backend", abort=True, backend=first)
            return
        await self.end_txn(
            Action.TEMPFAIL if why == "shutdown" else Action.ACCEPT, why, abort=True, aborted=True
        )

    async def end_txn(
        self,
        action: Action,
        reason: str,
        *,
        abort: bool,
        size: int = 0,
        aborted: bool = False,
        **extra: str,
    ) -> None:
        txn, self.t.backend = self.t.backend, None
        self.room.release()  # the message's bytes
        if txn is not None:
            if abort:
                with contextlib.suppress(BackendError):
                    await txn.abort()
            else:
                await txn.finish()
        self.txn_outcome(action, reason, size=size, aborted=aborted, **extra)
        # The one place a transaction ends: its state and its facts go together.
        self.ctx.new_transaction()
        self.t = Transaction()

    def txn_outcome(
        self, action: Action, reason: str, *, size: int = 0, aborted: bool = False, **extra: object
    ) -> None:
        self.txn_count += 1
        outcome = record(self.id, self.txn_count, self.ctx, self.t, action, reason, size=size,
                         aborted=aborted, **extra)  # fmt: skip
        dmarc = self.svc.dmarc
        if dmarc is not None and self.ctx.facts.dmarc is not None:
            dmarc.note(self.ctx, action, outcome)  # for aggregate reports
        if outcome == "delivered":  # a refused MAIL must not reset the junk count
            self.junk = 0


# Every session's duration goes to the one series of this process.
_SESSION_SECONDS = metrics.child(metrics.SESSION_SECONDS)

# RFC 2920 3.1: these end a pipelined group; the client must wait for their reply
# (HELO too: pipelining is only known from the EHLO reply). QUIT is left out: what
# follows it is never read anyway.

# Each verb's handler: the envelope's (smtp/envelope.py), the message's
# (smtp/message.py), STARTTLS (smtp/opening.py), and the session's own small ones.
_COMMANDS: dict[bytes, Callable[[Session, str], Awaitable[None]]] = {
    b"EHLO": envelope.ehlo,
    b"HELO": envelope.helo,
    b"MAIL": envelope.mail,
    b"RCPT": envelope.rcpt,
    b"DATA": message.data,
    b"RSET": Session.cmd_rset,
    b"NOOP": Session.cmd_noop,
    b"QUIT": Session.cmd_quit,
    b"VRFY": Session.cmd_vrfy,
    b"EXPN": Session.cmd_expn,
    b"HELP": Session.cmd_help,
    b"AUTH": Session.cmd_auth,
    b"BDAT": Session.cmd_bdat,
    b"XCLIENT": Session.cmd_xcmd,
    b"XFORWARD": Session.cmd_xcmd,
    b"STARTTLS": opening.starttls,
}
