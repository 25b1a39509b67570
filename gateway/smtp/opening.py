"""The start of a session, before its first command: a PROXY header from a load
balancer we trust, the implicit-TLS handshake, the checks at connect (a refusal
is 554 and a wait for QUIT, or 421), the greet pause that catches clients that
talk first; and STARTTLS, which starts the session again over TLS."""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

from gateway import config, logs, metrics, replies
from gateway.net import plain_ip
from gateway.replies import Reply
from gateway.smtp import tls
from gateway.smtp.protocol import SessionEnd
from gateway.smtp.proxy import ProxyError, read_header
from gateway.stream import StreamClosed
from gateway.vocab import Stage

if TYPE_CHECKING:
    from gateway.smtp.session import Session

# After a 554 greeting: commands answered (503) while waiting for QUIT, and for how long.
AFTER_554_COMMANDS = 5
AFTER_554_SECONDS = 10.0


async def open_session(s: Session) -> bool:
    """Up to the greeting: False when the session ends before it (refused, or the
    handshake or PROXY header failed), with what the client was told sent."""
    cfg = s.listener.cfg
    if cfg.proxy_protocol:
        if not s.svc.is_proxy(s.ctx.client_ip):
            metrics.child(metrics.CONNECTIONS, cfg.name, "refused_proxy_untrusted").inc()
            logs.event("proxy_refused", session=s.id, peer=s.ctx.client_ip)
            s.stream.abort()
            return False
        try:
            async with asyncio.timeout(s.limits.proxy_header_timeout):
                info = await read_header(s.stream)
        except (ProxyError, TimeoutError, StreamClosed) as e:
            metrics.child(metrics.CONNECTIONS, cfg.name, "refused_proxy_header").inc()
            logs.event(
                "proxy_refused",
                session=s.id,
                peer=s.ctx.client_ip,
                reason=str(e) or type(e).__name__,
            )
            s.stream.abort()
            return False
        if info.src_addr is not None:
            s.ctx.client_ip = plain_ip(info.src_addr)
            s.ctx.client_port = info.src_port or 0
    s.ctx.trusted = s.svc.is_trusted(s.ctx.client_ip)
    # Implicit TLS (465): the handshake is ours, after any PROXY header, so it is
    # timed, counted and uses the certificate current at this moment.
    if cfg.tls is config.TlsMode.IMPLICIT and not await handshake(s):
        metrics.child(metrics.CONNECTIONS, cfg.name, "refused_tls").inc()
        return False
    if s.svc.runner.has_checks(Stage.CONNECT):
        verdict = await s.svc.runner.run(Stage.CONNECT, s.ctx)
        if verdict.refuses:
            metrics.child(metrics.CONNECTIONS, cfg.name, "refused_policy").inc()
            reply = s.policy_reply(verdict, Stage.CONNECT)
            s.send(reply, policy=True)
            s.flush()
            if reply.code == 554:
                await until_quit(s)
            return False
    metrics.child(metrics.CONNECTIONS, cfg.name, "accepted").inc()
    s.sync = s.limits.enforce_sync and not s.ctx.trusted
    if s.sync:
        pause = s.limits.greet_pause
        if s.stream.pending or (pause and await s.stream.wait_input(pause)):
            s.out_of_sync(replies.PREGREET, "")
    s.send_raw(f"220 {s.settings.hostname} ESMTP ready\r\n".encode())
    s.flush()
    return True


async def until_quit(s: Session) -> None:
    """RFC 5321 3.1: after a 554 greeting the server waits for QUIT and answers
    anything else with 503. Bounded, so a refused client holds its connection
    for little: at most AFTER_554_COMMANDS commands within AFTER_554_SECONDS."""
    stream = s.stream
    limit = s.limits.max_command_line
    try:
        async with asyncio.timeout(AFTER_554_SECONDS):
            for _ in range(AFTER_554_COMMANDS):
                cmd = s.rx.next_command(limit)
                while cmd is None:
                    await stream.more()
                    cmd = s.rx.next_command(limit)
                if not isinstance(cmd, Reply) and cmd.verb == b"QUIT" and not cmd.arg:
                    s.send(replies.BYE)
                    s.flush()
                    return
                s.send(replies.REFUSED_SESSION)
                s.flush()
    except (TimeoutError, StreamClosed, ConnectionError):
        pass


async def starttls(s: Session, arg: str) -> None:
    if s.listener.cfg.tls is not config.TlsMode.STARTTLS or s.listener.tls is None:
        s.send(replies.TLS_NOT_OFFERED)
        return
    if s.stream.tls_object is not None:
        s.send(replies.TLS_ALREADY)
        return
    if arg:
        s.send(replies.SYNTAX_ARGS)
        return
    s.send(replies.START_TLS)
    s.flush()
    if not await handshake(s):
        raise SessionEnd
    # RFC 3207 4.2: forget everything learned before the handshake (and the
    # stream discarded whatever the client pipelined after STARTTLS).
    await s.abort_txn("starttls")
    s.ctx.helo = None
    s.esmtp = False


async def handshake(s: Session) -> bool:
    lt = s.listener.tls
    assert lt is not None
    try:
        implicit = s.listener.cfg.tls is config.TlsMode.IMPLICIT
        await s.stream.start_tls(
            lt.context,
            server_side=True,
            keep_buffer=implicit,
            handshake_timeout=s.limits.command_timeout,
        )
    except (OSError, ssl.SSLError, StreamClosed, ConnectionError, TimeoutError) as e:
        reason = tls.failure_reason(e)
        metrics.child(metrics.TLS_HANDSHAKE_FAILURES, s.listener.cfg.name, reason).inc()
        logs.event(
            "tls_failed",
            session=s.id,
            client=s.ctx.client_ip,
            reason=reason,
            error=str(e) or type(e).__name__,
        )
        s.stream.abort()
        return False
    s.ctx.tls_version, s.ctx.tls_cipher = tls.describe(s.stream.tls_object)
    return True


# -- helpers ---------------------------------------------------------------------
