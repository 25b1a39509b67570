"""The SMTP server side: one coroutine per connection, command by command.

This module is protocol plumbing. It asks the pipeline runner for a verdict at
each stage, asks replies.py for wording, and relays the backend's own
replies. The invariant it keeps: the client hears 250 for DATA only after the
backend said 250; any backend failure becomes a 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from gateway import config, headers, logs, metrics, replies
from gateway.address import Address, parse_path
from gateway.context import Context
from gateway.forward import relay
from gateway.forward.backend import (
    BackendUnavailable,
    ClientInfo,
    client_reply,
)
from gateway.forward.client import BackendError, SmtpReply
from gateway.net import plain_ip
from gateway.pipeline.policy import Policy
from gateway.pipeline.runner import View
from gateway.replies import Reply
from gateway.smtp import protocol, recipients, tls
from gateway.smtp.data import THREAD_BYTES, DataRefused, check_header_section, read_message
from gateway.smtp.memory import Reservation
from gateway.smtp.outcome import outcome_of, record
from gateway.smtp.protocol import LAST_IN_GROUP
from gateway.smtp.proxy import ProxyError, read_header
from gateway.smtp.services import ListenerState, Services, new_session_id
from gateway.smtp.transaction import Transaction
from gateway.stream import LineTooLong, Stream, StreamClosed
from gateway.vocab import Action, Stage, Verdict, action_of_code
from gateway.wire import unstuff_pieces

log = logging.getLogger("gateway.smtp")


class SessionEnd(Exception):
    """Close the connection after what was already sent."""


class Session:
    """One client connection."""

    def __init__(self, svc: Services, listener: ListenerState, stream: Stream) -> None:
        self.svc = svc
        self.settings = svc.settings
        self.limits = svc.settings.limits
        self.authserv_id = svc.settings.authserv_id or svc.settings.hostname
        self.listener = listener
        self.stream = stream
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
                self._count_error(r.reason or "other")

    def send_raw(self, data: bytes) -> None:
        self.out.append(data)

    def relay(self, reply: SmtpReply) -> None:
        self.out.append(replies.backend_wire(reply.code, tuple(reply.lines)))

    def flush(self) -> None:
        if self.out:
            self.stream.write(b"".join(self.out))
            self.out.clear()

    def _count_error(self, reason: str) -> None:
        self.errors += 1
        metrics.child(metrics.COMMAND_ERRORS, reason).inc()

    # -- main loop ----------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.listener.cfg
        try:
            if not await self._open():
                return
            # The command loop is here, not in a coroutine of its own: every wait of
            # the session resumes through each frame of its stack.
            limits = self.limits
            stream = self.stream
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
                    line = stream.take_line(limits.max_command_line)
                    while line is None:
                        await stream.wait_line(limits.max_command_line)
                        line = stream.take_line(limits.max_command_line)
                except TimeoutError:
                    self.send(replies.TIMEOUT)
                    raise SessionEnd from None
                except LineTooLong:
                    self.send(replies.LINE_TOO_LONG)
                    continue
                finally:
                    self.idle = False
                cmd = protocol.parse_line(line)
                if isinstance(cmd, Reply):
                    self.send(cmd)
                    continue
                verb = cmd.verb
                handler = _COMMANDS.get(verb)
                if self.sync and (verb in LAST_IN_GROUP or not self.esmtp) and stream.pending:
                    self._out_of_sync(replies.SYNC_ERROR, verb.decode("ascii", "replace"))
                if handler is None:
                    self.send(replies.SYNTAX_UNRECOGNIZED)
                    continue
                await handler(self, cmd.arg)
        except asyncio.CancelledError:
            # Drain: tell the client, so it retries elsewhere, and undo at the backend.
            self.out.clear()
            self.send(replies.SHUTTING_DOWN)
            self.flush()
            await self._abort_txn("shutdown")
            raise
        except (StreamClosed, ConnectionError):
            await self._abort_txn("client_lost")
        except SessionEnd:
            self.flush()
            await self._abort_txn("closed")
        except Exception:
            log.exception("session %s crashed", self.id)
            self.out.clear()
            self.send(replies.LOCAL_ERROR)
            self.flush()
            await self._abort_txn("local_error")
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

    async def _open(self) -> bool:
        cfg = self.listener.cfg
        if cfg.proxy_protocol:
            if not self.svc.is_proxy(self.ctx.client_ip):
                metrics.child(metrics.CONNECTIONS, cfg.name, "refused_proxy_untrusted").inc()
                logs.event("proxy_refused", session=self.id, peer=self.ctx.client_ip)
                self.stream.abort()
                return False
            try:
                async with asyncio.timeout(self.limits.proxy_header_timeout):
                    info = await read_header(self.stream)
            except (ProxyError, TimeoutError, StreamClosed) as e:
                metrics.child(metrics.CONNECTIONS, cfg.name, "refused_proxy_header").inc()
                logs.event(
                    "proxy_refused",
                    session=self.id,
                    peer=self.ctx.client_ip,
                    reason=str(e) or type(e).__name__,
                )
                self.stream.abort()
                return False
            if info.src_addr is not None:
                self.ctx.client_ip = plain_ip(info.src_addr)
                self.ctx.client_port = info.src_port or 0
        self.ctx.trusted = self.svc.is_trusted(self.ctx.client_ip)
        # Implicit TLS (465): the handshake is ours, after any PROXY header, so it is
        # timed, counted and uses the certificate current at this moment.
        if cfg.tls is config.TlsMode.IMPLICIT and not await self._handshake():
            metrics.child(metrics.CONNECTIONS, cfg.name, "refused_tls").inc()
            return False
        if self.svc.runner.has_checks(Stage.CONNECT):
            verdict = await self.svc.runner.run(Stage.CONNECT, self.ctx)
            if verdict.refuses:
                metrics.child(metrics.CONNECTIONS, cfg.name, "refused_policy").inc()
                reply = self._policy_reply(verdict, Stage.CONNECT)
                self.send(reply, policy=True)
                self.flush()
                if reply.code == 554:
                    await self._until_quit()
                return False
        metrics.child(metrics.CONNECTIONS, cfg.name, "accepted").inc()
        self.sync = self.limits.enforce_sync and not self.ctx.trusted
        if self.sync:
            pause = self.limits.greet_pause
            if self.stream.pending or (pause and await self.stream.wait_input(pause)):
                self._out_of_sync(replies.PREGREET, "")
        self.send_raw(f"220 {self.settings.hostname} ESMTP ready\r\n".encode())
        self.flush()
        return True

    async def _until_quit(self) -> None:
        """RFC 5321 3.1: after a 554 greeting the server waits for QUIT and answers
        anything else with 503. Bounded, so a refused client holds its connection
        for little: at most AFTER_554_COMMANDS commands within AFTER_554_SECONDS."""
        stream = self.stream
        try:
            async with asyncio.timeout(AFTER_554_SECONDS):
                for _ in range(AFTER_554_COMMANDS):
                    line = stream.take_line(self.limits.max_command_line)
                    while line is None:
                        await stream.wait_line(self.limits.max_command_line)
                        line = stream.take_line(self.limits.max_command_line)
                    if line[:4].upper() == b"QUIT" and line[4:].strip() == b"":
                        self.send(replies.BYE)
                        self.flush()
                        return
                    self.send(replies.REFUSED_SESSION)
                    self.flush()
        except (TimeoutError, StreamClosed, LineTooLong, ConnectionError):
            pass

    def _out_of_sync(self, reply: Reply, after: str) -> None:
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
    async def cmd_ehlo(self, arg: str) -> None:
        await self._helo(arg, esmtp=True)

    async def cmd_helo(self, arg: str) -> None:
        await self._helo(arg, esmtp=False)

    async def _helo(self, arg: str, *, esmtp: bool) -> None:
        if not arg:
            self.send(replies.SYNTAX_HELO)
            return
        self._junk()  # as Postfix: a greeting repeated in a loop is a way to hold a slot
        await self._abort_txn("helo")
        self.ctx.helo = arg.split(" ", 1)[0][:255]
        self.esmtp = esmtp
        if self.svc.runner.has_checks(Stage.HELO):
            verdict = await self.svc.runner.run(Stage.HELO, self.ctx)
            if verdict.refuses:
                self.send(self._policy_reply(verdict, Stage.HELO), policy=True)
                return
        host = self.settings.hostname
        if not esmtp:
            self.send_raw(f"250 {host}\r\n".encode())
            return
        caps = self.listener.ehlo_tls if self.stream.tls_object else self.listener.ehlo_plain
        self.send_raw(f"250-{host}\r\n".encode() + caps)

    @property
    def view(self) -> View:
        """The policy the current transaction runs under (taken at its MAIL), or the
        current one outside a transaction."""
        return self.t.view or self.svc.runner.view

    @property
    def phase(self) -> protocol.Phase:
        ctx = self.ctx
        return protocol.phase_of(ctx.helo, ctx.mail_from, len(ctx.recipients))

    async def cmd_mail(self, arg: str) -> None:
        refused = protocol.out_of_sequence(self.phase, b"MAIL")
        if refused is None and self.t.backend is not None:
            refused = replies.NESTED_MAIL
        if refused is replies.NEED_HELO:
            self.send(refused)
            return
        if self.listener.cfg.require_tls and self.stream.tls_object is None:
            self.send(replies.TLS_REQUIRED)
            return
        if refused is not None:
            self.send(refused)
            return
        if arg[:5].upper() != "FROM:":
            self.send(replies.SYNTAX_MAIL)
            return
        parsed = protocol.path_and_params(arg[5:].lstrip(" "), sender=True, utf8_mail=False)
        if isinstance(parsed, Reply):
            self.send(parsed)
            return
        addr, params = parsed
        mail = protocol.mail_parameters(
            params,
            max_size=self.svc.max_size,
            tls=self.stream.tls_object is not None,
            requiretls=self.listener.requiretls,
        )
        if isinstance(mail, Reply):
            self.send(mail)
            return
        declared, fwd = mail.declared, mail.forward
        # The policy this transaction runs under to its end (a reload meanwhile
        # applies from the next MAIL): its checks, actions, rewriter and headers.
        self.t = Transaction(started=time.monotonic(), view=self.svc.runner.view)
        self.ctx.new_transaction()
        self.ctx.mail_from = addr  # a refused MAIL's log line names its sender too
        # The process's memory budget (smtp/memory.py): a MAIL whose SIZE= does not
        # fit in what is left, or any while nothing is, waits its turn for room (up
        # to limits.data_memory_wait), before the client sends a byte; admitted, its
        # SIZE= is pledged to it until its bytes come (or the wait's time passes).
        if not self.room.admit(declared) and not await self._wait_for_memory(declared):
            self.send(replies.NO_MEMORY)
            self._txn_outcome(Action.TEMPFAIL, replies.NO_MEMORY.reason)
            self.ctx.new_transaction()
            return
        self.t.utf8 = mail.utf8
        if self.view.has_checks(Stage.MAIL):
            verdict = await self.svc.runner.run(Stage.MAIL, self.ctx, self.view)
            if verdict.refuses:
                self.send(self._policy_reply(verdict, Stage.MAIL), policy=True)
                self._txn_outcome(verdict.action, verdict.symbol)
                self._no_transaction()
                return
        info = ClientInfo(
            self.ctx.client_ip,
            self.ctx.client_port,
            self.ctx.helo,
            self.esmtp,
            self.stream.tls_object is not None,
        )
        # Sender rewriting comes after the MAIL checks (SPF judged what the client
        # sent); ctx.mail_from stays the original for DMARC and the logs.
        rewriter = self.view.policy.rewriter
        self.t.backend_sender = rewriter.sender(addr) if rewriter.active else addr
        try:
            reply, txn = await self.link.begin(info, str(self.t.backend_sender), fwd)
        except BackendUnavailable as e:
            refused = client_reply(e)
            self.send(refused)
            self._txn_outcome(Action.TEMPFAIL, refused.reason, error=str(e))
            self._no_transaction()
            return
        if txn is None:
            self.relay(reply)
            self._txn_outcome(action_of_code(reply.code), "backend", backend=str(reply))
            self._no_transaction()
            return
        self.t.backend = txn
        self.t.client, self.t.mail_params = info, fwd
        self.relay(reply)

    async def _wait_for_memory(self, size: int) -> bool:
        """Wait in line for room in the memory budget. The session counts as idle
        meanwhile (no transaction yet), so a drain ends it at once with 421."""
        memory = self.svc.memory
        if not memory.wait or self.svc.draining:
            return False
        self.idle = True
        try:
            admitted = await self.room.wait_admit(size)
        finally:
            self.idle = False
        metrics.child(metrics.MESSAGE_MEMORY_WAITS, "admitted" if admitted else "timeout").inc()
        return admitted

    def _no_transaction(self) -> None:
        """MAIL admitted, then refused (a check, the backend): what it holds goes back."""
        self.ctx.new_transaction()
        self.room.release()

    async def cmd_rcpt(self, arg: str) -> None:
        refused = protocol.out_of_sequence(self.phase, b"RCPT")
        if refused is not None:
            self.send(refused)
            return
        if arg[:3].upper() != "TO:":
            self.send(replies.SYNTAX_RCPT)
            return
        utf8 = self.t.utf8
        parsed = protocol.path_and_params(arg[3:].lstrip(" "), sender=False, utf8_mail=utf8)
        if isinstance(parsed, Reply):
            self.send(parsed)
            return
        addr, params = parsed
        dsn_params = protocol.rcpt_parameters(params, utf8=utf8)
        if isinstance(dsn_params, Reply):
            self.send(dsn_params)
            return
        if len(self.ctx.recipients) >= self.limits.max_recipients:
            self.send(replies.TOO_MANY_RECIPIENTS)
            metrics.child(metrics.RECIPIENTS, "tempfailed", "too_many_recipients").inc()
            return
        self.t.rcpt_tried += 1
        rewriter = self.view.policy.rewriter
        original = addr
        if rewriter.active:
            # Relay control and the RCPT checks judge the canonical address.
            addr = rewriter.canonical_recipient(addr)
        self.ctx.rcpt = addr
        verdict = await self.svc.runner.run(Stage.RCPT, self.ctx, self.view)
        if verdict.refuses:
            reply = self._policy_reply(verdict, Stage.RCPT)
            self.send(reply, policy=True)
            metrics.child(metrics.RECIPIENTS, outcome_of(verdict.action), verdict.symbol).inc()
            logs.event(
                "rcpt_refused",
                session=self.id,
                rcpt=str(original),
                reason=verdict.symbol,
                reply=str(reply),
            )
            return
        if self.t.broken is not None or self.t.backend is None:
            self.send(self.t.broken or replies.BACKEND_LOST)
            return
        targets = [addr]
        if rewriter.active:
            sender = self.ctx.mail_from
            expanded = recipients.expand(
                rewriter,
                original,
                addr,
                client_ip=self.ctx.client_ip,
                bounce=sender is not None and sender.is_null,
                srs_failures=self.svc.srs_failures,
                session_id=self.id,
            )
            if isinstance(expanded, Reply):
                self.send(expanded)
                return
            targets = expanded
            if rewriter.srs is not None and not await self._srs_if_forwarding(targets):
                return
        await self._backend_rcpts(original, targets, dsn_params)

    async def _srs_if_forwarding(self, targets: list[Address]) -> bool:
        """A recipient that leaves our domains gets the SRS sender: the backend
        transaction is opened again with it (earlier recipients replayed)."""
        rewriter = self.view.policy.rewriter
        sender = self.t.backend_sender
        assert sender is not None  # RCPT comes after the backend took MAIL
        if sender.is_null or all(self.svc.is_local(t) for t in targets):
            return True
        srs_sender = rewriter.srs_forward(sender)
        if srs_sender == sender:
            return True
        refused = await self._rebegin(srs_sender, list(self.ctx.recipients))
        if refused is not None:
            self.send(refused)
            return False
        logs.event("srs_forward", session=self.id, sender=str(sender), srs=str(srs_sender))
        return True

    async def _backend_rcpts(
        self, original: Address, targets: list[Address], params: list[str]
    ) -> None:
        """RCPT the (rewritten) addresses at the backend (forward/relay.py), then tell
        the client, count and log what came of it."""
        assert self.t.backend is not None
        out = await relay.fan_out(
            self.t.backend,
            original,
            targets,
            params,
            held=self.ctx.recipients,
            held_params=self.t.rcpt_params,
            max_recipients=self.limits.max_recipients,
        )
        if out.refused:
            room = max(_LOGGED_REFUSALS - len(self.t.rcpt_refused), 0)
            self.t.rcpt_refused += [r[:_LOGGED_REFUSAL_LEN] for r in out.refused[:room]]
        if out.error is not None:
            await self._backend_failed(out.error)
            return
        final = out.reply
        assert final is not None
        if out.over_limit:
            self.send(replies.TOO_MANY_RECIPIENTS)
            metrics.child(metrics.RECIPIENTS, "tempfailed", "too_many_recipients").inc()
            return
        if targets != [original]:
            self.ctx.rewritten.append((original, tuple(targets)))
        if isinstance(final, Reply):  # an alias some of whose members accepted
            metrics.child(metrics.RECIPIENTS, "accepted", "backend").inc()
            self.send(final)
            refused = [str(r) for r in out.results if not r.ok]
            if refused:
                logs.event("alias_members_refused", session=self.id, rcpt=str(original),
                           refused=refused)  # fmt: skip
            return
        outcome = "accepted" if final.ok else outcome_of(action_of_code(final.code))
        metrics.child(metrics.RECIPIENTS, outcome, "backend").inc()
        self.relay(final)
        if final.code >= 500:
            # The backend refused a recipient (unknown user): an error of this client's,
            # as the backend itself would count it. The backend's own limit cannot
            # hold (each client session gets a fresh backend session), so max_errors
            # must: else a client guesses mailboxes past it (the gateway's count).
            self._count_error("backend_refused")

    async def cmd_data(self, arg: str) -> None:
        if arg:
            self.send(replies.SYNTAX_ARGS)
            return
        refused = protocol.out_of_sequence(self.phase, b"DATA")
        if refused is replies.NEED_MAIL:
            self.send(refused)
            return
        if self.t.broken is not None:
            self.send(self.t.broken)
            return
        if refused is not None or self.t.backend is None:
            # No recipient accepted: none given yet, or every one refused.
            self.send(replies.NO_VALID_RECIPIENTS if self.t.rcpt_tried else replies.NEED_RCPT)
            return
        self.send(replies.START_DATA)
        self.flush()
        max_size = self.svc.max_size
        self.stream.set_high_water(max_size + 65536)
        self.stream.set_deadline(self.limits.data_timeout)
        try:
            # Charged to the process's memory budget as it arrives (smtp/memory.py);
            # _end_txn gives it back.
            wire = await read_message(self.stream, max_size, self.limits.bare_linefeed, self.room)
            check_header_section(wire, self.limits)
        except TimeoutError:
            self.send(replies.TIMEOUT)
            await self._end_txn(Action.TEMPFAIL, "timeout", abort=True)
            raise SessionEnd from None
        except DataRefused as e:
            self.send(e.reply)
            action = Action.TEMPFAIL if e.reply.temporary else Action.REJECT
            await self._end_txn(action, e.reply.reason, abort=True)
            return
        finally:
            self.stream.set_high_water(256 * 1024)
        size = len(wire)
        metrics.child(metrics.MESSAGE_SIZE).observe(size)
        self.ctx.wire = wire
        if size > THREAD_BYTES and self.view.has_checks(Stage.DATA):
            # The checks read the message unstuffed: a copy of it made on the loop
            # would hold every other session for tens of milliseconds.
            self.ctx.unstuffed(await asyncio.to_thread(unstuff_pieces, wire))
        verdict = await self.svc.runner.run(Stage.DATA, self.ctx, self.view)
        if verdict.refuses:
            self.send(self._policy_reply(verdict, Stage.DATA), policy=True)
            await self._end_txn(verdict.action, verdict.symbol, abort=True, size=size)
            return
        rewriter = self.view.policy.rewriter
        extra = b""
        if rewriter.active:
            # After every check: DMARC judged the From the client sent.
            wire = rewriter.headers(wire)
            extra = self._original_recipient()
        policy = self.view.policy
        recipients = self.ctx.recipients
        verdicts = headers.Verdicts(
            self.authserv_id,
            self.ctx.auth,
            policy.tag.header,
            self.ctx.tags,
            (policy.quarantine.header, [str(r) for r in recipients])
            if self.ctx.quarantine
            else None,
        )
        wire, prefix, forged = headers.compose(
            wire, self._received(), self._our_fields(policy), verdicts, extra
        )
        if forged:
            logs.event("forged_ar_removed", session=self.id, count=forged)
        n_rcpts = len(recipients)
        if self.ctx.quarantine and policy.quarantine.mode == "redirect":
            assert policy.quarantine.recipient is not None  # the policy model requires it
            refused = await self._redirect(policy.quarantine.recipient)
            if refused is not None:
                self.send(refused)
                await self._end_txn(Action.TEMPFAIL, "quarantine_failed", abort=True)
                return
            n_rcpts = 1
        txn = self.t.backend
        assert txn is not None
        try:
            results = await txn.data(wire, n_rcpts, prefix)
        except BackendError as e:
            self.send(client_reply(e))
            await self._end_txn(
                Action.TEMPFAIL, "backend_lost", abort=True, size=size, error=str(e)
            )
            return
        final = relay.combine_lmtp(results, self.ctx.recipients)
        if isinstance(final, Reply):
            self.send_raw(final.wire())  # the backend's verdict: not a client error
        else:
            self.relay(final)
        code = final.code
        action = action_of_code(code)
        await self._end_txn(action, "backend", abort=False, size=size, backend=str(final))

    def _our_fields(self, policy: Policy) -> headers.OurFields:
        names = [policy.tag.header, policy.quarantine.header, *_MTA_FIELDS]
        if policy.rewrite.original_recipient_header:
            names.append(policy.rewrite.original_recipient_header)
        return headers.our_fields(self.authserv_id, self.settings.hostname, tuple(names))

    def _original_recipient(self) -> bytes:
        """X-Original-To (or the configured name) for a single rewritten recipient;
        never with several, where it would show each recipient the others (Bcc)."""
        name = self.view.policy.rewrite.original_recipient_header
        rw = self.ctx.rewritten
        if name is None or len(rw) != 1 or self.t.rcpt_tried != 1:
            return b""
        return f"{name}: {rw[0][0]}\r\n".encode()

    async def _rebegin(self, sender: Address, recipients: list[Address]) -> Reply | None:
        """Open the backend transaction again with this sender and these recipients
        (forward/relay.py); if that fails, this and every later command of the
        transaction gets a 4xx."""
        old, self.t.backend = self.t.backend, None
        assert self.t.client is not None
        txn = await relay.reopen(
            self.link, old, self.t.client, sender, self.t.mail_params, recipients,
            self.t.rcpt_params,
        )  # fmt: skip
        if not isinstance(txn, str):
            self.t.backend = txn
            self.t.backend_sender = sender
            return None
        logs.failure("backend_reopen_failed", session=self.id, error=txn)
        self.t.broken = replies.BACKEND_REOPEN_FAILED
        return replies.BACKEND_REOPEN_FAILED

    async def _redirect(self, recipient: str) -> Reply | None:
        """Quarantine by redirection: abandon the original recipients at the backend
        and open the transaction again for the quarantine mailbox only."""
        sender = self.t.backend_sender
        assert sender is not None  # DATA comes after the backend took MAIL
        refused = await self._rebegin(sender, [parse_path(f"<{recipient}>")])
        if refused is None:
            logs.event(
                "quarantined",
                session=self.id,
                to=recipient,
                original=[str(a) for a in self.ctx.recipients],
            )
        return refused

    def _junk(self) -> None:
        """NOOP, RSET, VRFY, HELP, EHLO/HELO: harmless one by one, a way to hold a slot and burn
        CPU in a flood. Past `max_junk_commands` in a row without a transaction, each
        one counts as an error, so the flood ends with 421 4.7.0 (Postfix's
        smtpd_junk_command_limit)."""
        self.junk += 1
        if self.junk > self.limits.max_junk_commands:
            self._count_error("junk_commands")

    async def cmd_rset(self, arg: str) -> None:
        self._junk()
        await self._abort_txn("rset")
        self.send(replies.RESET_OK)

    async def cmd_noop(self, arg: str) -> None:
        self._junk()
        self.send(replies.NOOP_OK)

    async def cmd_quit(self, arg: str) -> None:
        self.send(replies.BYE)
        raise SessionEnd

    async def cmd_vrfy(self, arg: str) -> None:
        self._junk()
        self.send(replies.VRFY_CANNOT if arg else replies.SYNTAX_ARGS)

    async def cmd_expn(self, arg: str) -> None:
        self.send(replies.NOT_IMPLEMENTED)

    async def cmd_help(self, arg: str) -> None:
        self._junk()
        self.send(replies.HELP)

    async def cmd_auth(self, arg: str) -> None:
        self.send(replies.AUTH_NOT_OFFERED)

    async def cmd_bdat(self, arg: str) -> None:
        self.send(replies.BDAT_NOT_OFFERED)

    async def cmd_xcmd(self, arg: str) -> None:
        self.send(replies.XCOMMAND_REFUSED)

    async def cmd_starttls(self, arg: str) -> None:
        if self.listener.cfg.tls is not config.TlsMode.STARTTLS or self.listener.tls is None:
            self.send(replies.TLS_NOT_OFFERED)
            return
        if self.stream.tls_object is not None:
            self.send(replies.TLS_ALREADY)
            return
        if arg:
            self.send(replies.SYNTAX_ARGS)
            return
        self.send(replies.START_TLS)
        self.flush()
        if not await self._handshake():
            raise SessionEnd
        # RFC 3207 4.2: forget everything learned before the handshake (and the
        # stream discarded whatever the client pipelined after STARTTLS).
        await self._abort_txn("starttls")
        self.ctx.helo = None
        self.esmtp = False

    async def _handshake(self) -> bool:
        lt = self.listener.tls
        assert lt is not None
        try:
            implicit = self.listener.cfg.tls is config.TlsMode.IMPLICIT
            await self.stream.start_tls(
                lt.context,
                server_side=True,
                keep_buffer=implicit,
                handshake_timeout=self.limits.command_timeout,
            )
        except (OSError, ssl.SSLError, StreamClosed, ConnectionError, TimeoutError) as e:
            reason = tls.failure_reason(e)
            metrics.child(metrics.TLS_HANDSHAKE_FAILURES, self.listener.cfg.name, reason).inc()
            logs.event(
                "tls_failed",
                session=self.id,
                client=self.ctx.client_ip,
                reason=reason,
                error=str(e) or type(e).__name__,
            )
            self.stream.abort()
            return False
        self.ctx.tls_version, self.ctx.tls_cipher = tls.describe(self.stream.tls_object)
        return True

    # -- helpers ---------------------------------------------------------------------
    def _policy_reply(self, verdict: Verdict, stage: Stage) -> Reply:
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

    def _received(self) -> bytes:
        tls_desc = None
        # RFC 6531 3.7.3: a transaction under SMTPUTF8 is received "with UTF8SMTP(S)".
        proto = "UTF8SMTP" if self.t.utf8 else "ESMTP" if self.esmtp else "SMTP"
        if self.ctx.tls_version:
            proto += "S"
            tls_desc = (
                f"version={self.ctx.tls_version.replace('v', '').replace('.', '_')} "
                f"cipher={self.ctx.tls_cipher}"
            )
        rcpts = self.ctx.recipients
        return headers.received(
            helo=self.ctx.helo,
            client_ip=self.ctx.client_ip,
            hostname=self.settings.hostname,
            proto=proto,
            session_id=self.id,
            tls=tls_desc,
            recipient=str(rcpts[0]) if len(rcpts) == 1 else None,
        )

    async def _backend_failed(self, e: BackendError) -> None:
        """The backend dropped mid-transaction: this transaction can only tempfail now."""
        reply = client_reply(e)
        self.t.broken = reply
        self.send(reply)
        logs.failure("backend_error", session=self.id, error=str(e))
        if self.t.backend is not None:
            await self.t.backend.abort()
            self.t.backend = None

    async def _abort_txn(self, why: str) -> None:
        if self.ctx.mail_from is None and self.t.backend is None:
            return
        if self.t.rcpt_refused and not self.ctx.recipients and why != "shutdown":
            # Every recipient was refused by the backend: that, not the client's QUIT
            # or RSET after it, is how the transaction ended.
            first = self.t.rcpt_refused[0]
            code = first[first.index("> ") + 2 :][:1]
            action = Action.TEMPFAIL if code == "4" else Action.REJECT
            await self._end_txn(action, "backend", abort=True, backend=first)
            return
        await self._end_txn(
            Action.TEMPFAIL if why == "shutdown" else Action.ACCEPT, why, abort=True, aborted=True
        )

    async def _end_txn(
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
        self._txn_outcome(action, reason, size=size, aborted=aborted, **extra)
        # The one place a transaction ends: its state and its facts go together.
        self.ctx.new_transaction()
        self.t = Transaction()

    def _txn_outcome(
        self, action: Action, reason: str, *, size: int = 0, aborted: bool = False, **extra: object
    ) -> None:
        self.txn_count += 1
        outcome = record(self.id, self.txn_count, self.ctx, self.t, action, reason, size=size,
                         aborted=aborted, **extra)  # fmt: skip
        if outcome == "delivered":  # a refused MAIL must not reset the junk count
            self.junk = 0


# Every session's duration goes to the one series of this process.
_SESSION_SECONDS = metrics.child(metrics.SESSION_SECONDS)

# After a 554 greeting: commands answered (503) while waiting for QUIT, and for how long.
AFTER_554_COMMANDS = 5
AFTER_554_SECONDS = 10.0

# Fields a receiving MTA adds at delivery, which a filter after it may trust: never
# the sender's to write.
_MTA_FIELDS = ("X-Original-To",)

# A transaction's log line names at most this many recipients the backend refused,
# each cut to this length: the count of recipients is the client's to choose.
_LOGGED_REFUSALS = 10
_LOGGED_REFUSAL_LEN = 300


# RFC 2920 3.1: these end a pipelined group; the client must wait for their reply
# (HELO too: pipelining is only known from the EHLO reply). QUIT is left out: what
# follows it is never read anyway.

_COMMANDS: dict[bytes, Callable[[Session, str], Awaitable[None]]] = {
    b"EHLO": Session.cmd_ehlo,
    b"HELO": Session.cmd_helo,
    b"MAIL": Session.cmd_mail,
    b"RCPT": Session.cmd_rcpt,
    b"DATA": Session.cmd_data,
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
    b"STARTTLS": Session.cmd_starttls,
}
