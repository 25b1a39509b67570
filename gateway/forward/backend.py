"""The backend as the SMTP front end sees it: begin a transaction, pass RCPTs,
hand over the message. Failover across targets with a circuit breaker, and
XCLIENT/XFORWARD so the backend knows the real client; each client session
reaches the backend through its own session (forward/link.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

from gateway import config, dsn, metrics, replies
from gateway.address import ascii_path
from gateway.forward.client import (
    BackendBadReply,
    BackendBusy,
    BackendError,
    BackendLost,
    BackendRefusedClient,
    BackendTimeout,
    ClientCapReached,
    SmtpClient,
    SmtpReply,
)
from gateway.forward.link import ClientInfo, ClientLink, client_attrs
from gateway.forward.pool import Pool
from gateway.net import network_of
from gateway.wire import header_section

log = logging.getLogger("gateway.backend")

# Seconds between "backend busy" log lines of one target (Target.busy).
BUSY_LOG_INTERVAL = 10.0


class BackendUnavailable(BackendError):
    """No target could take the transaction; the client must get a 4xx. `busy`:
    the last one tried was up but had no session for us (BackendBusy); `refused`:
    it refused what this client brought (BackendRefusedClient); `client_cap`: this
    client holds its share of backend sessions (ClientCapReached)."""

    def __init__(
        self, message: str, busy: bool = False, refused: bool = False, client_cap: bool = False
    ) -> None:
        super().__init__(message)
        self.busy = busy
        self.refused = refused
        self.client_cap = client_cap


__all__ = ["BackendUnavailable", "ClientInfo"]


class Transaction(Protocol):
    def rcpt(self, rcpt: str, params: list[str]) -> Awaitable[SmtpReply]: ...

    def data(self, wire: bytes, recipients: int, prefix: bytes = b"") -> Awaitable[list[SmtpReply]]:
        """`wire`: dot-stuffed, CRLF-terminated lines, without the final dot;
        `prefix`: header fields to put in front of it."""

    async def finish(self) -> None:
        """The transaction completed; the session may be reused."""

    async def abort(self) -> None:
        """The client gave up (RSET, QUIT, error): undo at the backend."""


class Link(Protocol):
    """The backend as one client session sees it."""

    def begin(
        self, client: ClientInfo, sender: str, params: list[str]
    ) -> Awaitable[tuple[SmtpReply, Transaction | None]]: ...

    async def end(self) -> None:
        """The client session is over."""


class Backend(Protocol):
    def link(self) -> Link: ...

    @property
    def available(self) -> bool: ...

    async def close(self) -> None: ...


class Breaker:
    """Open after `failures` consecutive failures; one probe after `cooldown`."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        return time.monotonic() - self.opened_at >= self.cooldown

    @property
    def open(self) -> bool:
        return not self.allow()

    def success(self) -> bool:
        """Reset; True if that changed anything (the gauges need updating only then)."""
        changed = self.failures != 0 or self.opened_at is not None
        self.failures = 0
        self.opened_at = None
        return changed

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()


class Target:
    def __init__(
        self,
        url: str,
        cfg: config.Backend,
        helo: str,
        index: int = 0,
        max_open: int | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.label = str(index)  # metrics label: the position in backend.url
        self.url = url
        self.lmtp = parts.scheme == "lmtp"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (24 if self.lmtp else 25)
        self.cfg = cfg
        self.helo = helo
        self.tls_ctx = client_tls_context(cfg)
        self.breaker = Breaker(cfg.circuit_breaker.failures, cfg.circuit_breaker.cooldown)
        # The SIZE the backend advertised (RFC 1870), once a session has told us; None:
        # not known yet, or no fixed limit.
        self.size_limit: int | None = None
        self.on_size: Callable[[], None] | None = None  # told when size_limit changes
        self._busy_logged = -BUSY_LOG_INTERVAL
        self._busy_unlogged = 0
        self.pool = Pool(
            self._connect,
            size=cfg.pool_size,
            idle_timeout=cfg.idle_timeout,
            label=self.label,
            max_open=max_open,
            wait=cfg.connect_timeout,  # waiting for a session is part of getting one
        )

    def busy(self, error: BackendBusy) -> None:
        """Log that the target had no session for us: at a peak that is every
        deferred transaction, so one line per BUSY_LOG_INTERVAL with the count of
        the others (each transaction's own log line has its reason)."""
        now = time.monotonic()
        if now - self._busy_logged < BUSY_LOG_INTERVAL:
            self._busy_unlogged += 1
            return
        more, self._busy_unlogged, self._busy_logged = self._busy_unlogged, 0, now
        also = f" ({more} more since the last such line)" if more else ""
        log.warning("backend %s busy: %s%s", self.url, error, also)

    async def _connect(self) -> SmtpClient:
        client = await SmtpClient.connect(
            self.host,
            self.port,
            helo=self.helo,
            connect_timeout=self.cfg.connect_timeout,
            command_timeout=self.cfg.command_timeout,
            data_timeout=self.cfg.data_timeout,
            lmtp=self.lmtp,
            tls=self.tls_ctx,
            tls_required=self.cfg.tls is config.BackendTls.REQUIRED,
            server_name=self.cfg.server_name,
        )
        size = client.extensions.get("SIZE", "")
        limit = int(size) if size.isdigit() and 0 < len(size) < 20 and int(size) > 0 else None
        if limit != self.size_limit:
            self.size_limit = limit
            if self.on_size is not None:
                self.on_size()
        return client


def client_tls_context(cfg: config.Backend) -> ssl.SSLContext | None:
    if cfg.tls is config.BackendTls.NONE:
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.client_cert_file is not None:
        key = str(cfg.client_key_file) if cfg.client_key_file else None
        try:
            ctx.load_cert_chain(str(cfg.client_cert_file), key)
        except (OSError, ssl.SSLError) as e:
            raise config.ConfigError(
                f"backend.client_cert_file: cannot load certificate/key: {e}"
            ) from None
    if cfg.tls is config.BackendTls.OPPORTUNISTIC:
        # Opportunistic TLS protects against passive listeners only; verifying
        # would turn a backend's self-signed certificate into an outage.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _own(r: replies.Reply) -> SmtpReply:
    """One of our replies in the shape of a backend's, for answers given on its behalf."""
    return SmtpReply(r.code, [f"{r.enhanced} {r.text}"])


# The gateway's own answer to a deferred MAIL: made once, it goes out on every message.
_SENDER_OK = _own(replies.SENDER_OK)


class Fit(NamedTuple):
    params: list[str]  # the MAIL parameters this backend session can take
    utf8: bool  # UTF-8 addresses and header fields may still reach it
    eight_bit: bool  # 8-bit content may still reach it


def fit_params(params: list[str], extensions: dict[str, str]) -> Fit:
    """The client's MAIL parameters as this backend session can take them, and whether
    UTF-8 (addresses, header fields) and 8-bit content may still reach it.

    SMTPUTF8 and BODY=8BITMIME say what a message may hold, not what it holds:
    senders set them on plain ASCII mail too. A next hop that does not offer the
    extension would refuse the parameter (555), so it is dropped and the
    transaction checks instead what actually goes through (RFC 6531 3.2 and RFC
    6152 3 forbid sending it such content, not the mail itself). The DSN
    parameters go the same way (see gateway/dsn.py).
    """
    utf8 = eight_bit = True
    if "SMTPUTF8" in params and "SMTPUTF8" not in extensions:
        params = [p for p in params if p != "SMTPUTF8"]
        utf8 = False
    if "BODY=8BITMIME" in params and "8BITMIME" not in extensions:
        params = [p for p in params if p != "BODY=8BITMIME"]
        eight_bit = False
    return Fit(dsn.for_backend(params, extensions, dsn.MAIL_KEYS), utf8, eight_bit)


async def _refused(reply: SmtpReply) -> SmtpReply:
    return reply


class SmtpTransaction:
    def __init__(
        self,
        target: Target,
        client: SmtpClient,
        utf8: bool = True,
        eight_bit: bool = True,
    ) -> None:
        self.target = target
        self.client = client
        # False: the backend lacks SMTPUTF8 / 8BITMIME that the client asked for.
        self.utf8 = utf8
        self.eight_bit = eight_bit
        # The backend accepted the message: its transaction is over and the session
        # ready for the next. Any other end is reset with RSET before that.
        self.delivered = False

    # Plain functions handing back the client's coroutine: no frame of their own
    # for the wait on the backend's reply to resume through.
    def rcpt(self, rcpt: str, params: list[str]) -> Awaitable[SmtpReply]:
        if not self.utf8 and not rcpt.isascii():
            ascii_rcpt = ascii_path(rcpt)
            if ascii_rcpt is None:
                return _refused(_own(replies.SMTPUTF8_UNSUPPORTED))
            rcpt = ascii_rcpt
        return self.client.rcpt(rcpt, params)

    def data(self, wire: bytes, recipients: int, prefix: bytes = b"") -> Awaitable[list[SmtpReply]]:
        if not self.utf8 and not header_section(wire).isascii():
            return self._refuse_data(replies.UTF8_HEADERS_UNSUPPORTED)
        if not self.eight_bit and not wire.isascii():
            return self._refuse_data(replies.EIGHT_BIT_UNSUPPORTED)
        return self._data(wire, recipients, prefix)

    async def _data(self, wire: bytes, recipients: int, prefix: bytes) -> list[SmtpReply]:
        results = await self.client.data(wire, recipients, prefix)
        self.delivered = all(r.ok for r in results)
        return results

    async def _refuse_data(self, reply: replies.Reply) -> list[SmtpReply]:
        """Refused before DATA went out: the backend's transaction is reset here."""
        await reset(self.client)
        self.delivered = True  # nothing left open at the backend
        return [_own(reply)]

    async def finish(self) -> None:
        """The transaction is over; the session stays with its client session. One
        that did not end in the backend's acceptance is reset (RSET, checked), or
        closed, before it can carry another transaction: a refused SIZE= or DATA
        must not leave anything behind for the next one."""
        if not self.delivered:
            await reset(self.client)

    async def abort(self) -> None:
        await reset(self.client)


async def reset(client: SmtpClient) -> None:
    """RSET, checked; a session that does not answer 250 is closed."""
    if client.closed or not await client.rset():
        client.close()


class DeferredTransaction:
    """A transaction whose MAIL waits for the first RCPT, to go out with it in one
    round trip: a backend hop fewer per message (measured in bench/: see README).

    The price is that a backend's refusal of the sender (rare: the gateway has
    judged the sender already) answers the RCPT instead of the MAIL, as Postfix's
    own smtpd_delay_reject does for its sender restrictions; the next RCPT then
    tries MAIL again. `backend.defer_mail: false` passes MAIL through at MAIL.
    """

    __slots__ = ("backend", "client", "link", "opened", "params", "sender")

    def __init__(
        self,
        backend: SmtpBackend,
        link: SmtpLink,
        client: ClientInfo,
        sender: str,
        params: list[str],
    ) -> None:
        self.backend = backend
        self.link = link
        self.client = client
        self.sender = sender
        self.params = params
        self.opened: SmtpTransaction | None = None

    def rcpt(self, rcpt: str, params: list[str]) -> Awaitable[SmtpReply]:
        if self.opened is not None:
            return self.opened.rcpt(rcpt, params)
        return self._open(rcpt, params)

    async def _open(self, rcpt: str, params: list[str]) -> SmtpReply:
        reply, rcpt_reply, txn = await self.backend.open(
            self.link, self.client, self.sender, self.params, (rcpt, params)
        )
        if txn is None:
            return reply  # MAIL refused: its reply is the answer
        self.opened = txn
        assert rcpt_reply is not None  # sent along with an accepted MAIL, so answered
        return rcpt_reply

    def data(self, wire: bytes, recipients: int, prefix: bytes = b"") -> Awaitable[list[SmtpReply]]:
        assert self.opened is not None, "DATA without an accepted recipient"
        return self.opened.data(wire, recipients, prefix)

    async def finish(self) -> None:
        if self.opened is not None:
            await self.opened.finish()

    async def abort(self) -> None:
        if self.opened is not None:
            await self.opened.abort()


class SmtpLink(ClientLink):
    """One client session's way to the backend (forward/link.py)."""

    __slots__ = ("backend",)

    def __init__(self, backend: SmtpBackend) -> None:
        super().__init__()
        self.backend = backend

    def _admit(self, info: ClientInfo) -> None:
        self.backend.per_client.admit(info.addr)

    def _released(self, info: ClientInfo) -> None:
        self.backend.per_client.release(info.addr)

    def begin(
        self, client: ClientInfo, sender: str, params: list[str]
    ) -> Awaitable[tuple[SmtpReply, Transaction | None]]:
        return self.backend.begin(self, client, sender, params)


class PerClient:
    """Backend sessions held at once per client address and per /24 (/64): a
    client session holds at most one, so without this one client opening many
    sessions, each with a transaction, could hold every session the backend takes
    from us (backend.max_sessions). Its transactions over the cap get 451 4.4.5;
    other clients are not affected."""

    NETWORK_FACTOR = 4  # a network may hold this many times a single address's share

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held: dict[str, int] = {}

    def admit(self, addr: str) -> None:
        """Count one more session for `addr`, or raise BackendBusy past the caps."""
        if self.limit is None:
            return
        if self.held.get(addr, 0) >= self.limit:
            raise ClientCapReached(f"this client holds {self.limit} backend sessions already")
        net = network_of(addr)
        if self.held.get(net, 0) >= self.limit * self.NETWORK_FACTOR:
            raise ClientCapReached(f"this client's network holds {self.held[net]} backend sessions")
        for key in (addr, net):
            self.held[key] = self.held.get(key, 0) + 1

    def release(self, addr: str) -> None:
        if self.limit is not None:
            for key in (addr, network_of(addr)):
                left = self.held.get(key, 0) - 1
                if left > 0:
                    self.held[key] = left
                else:
                    self.held.pop(key, None)


class SmtpBackend:
    def __init__(self, cfg: config.Backend, helo: str, workers: int = 1) -> None:
        self.cfg = cfg
        # backend.max_sessions is what the backend sees from this instance: the
        # workers share it (rounded up).
        cap = None if cfg.max_sessions is None else -(-cfg.max_sessions // max(1, workers))
        self.targets = [Target(u, cfg, helo, i, cap) for i, u in enumerate(cfg.url)]
        self.per_client = PerClient(cfg.max_sessions_per_client)
        # Told when a target's SIZE changes (the app advertises the smaller of its own).
        self.on_size: Callable[[], None] | None = None
        for t in self.targets:
            t.on_size = self._size_changed
        self._update_gauge()

    def _size_changed(self) -> None:
        if self.on_size is not None:
            self.on_size()

    def link(self) -> SmtpLink:
        return SmtpLink(self)

    async def warm(self) -> None:
        """Open each target's spares now, waiting (up to connect_timeout) for them:
        the first greeting tells the target's SIZE. A target that is down is left
        to the first transaction."""
        tasks = [task for t in self.targets for task in t.pool.warm()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.cfg.connect_timeout)

    @property
    def size_limit(self) -> int | None:
        """The SIZE of the target new transactions go to, if it said one."""
        target = next((t for t in self.targets if t.breaker.allow()), self.targets[0])
        return target.size_limit

    @property
    def available(self) -> bool:
        return any(t.breaker.allow() for t in self.targets)

    def _update_gauge(self) -> None:
        metrics.child(metrics.BACKEND_UP).set(1 if self.available else 0)
        for t in self.targets:
            metrics.child(metrics.BACKEND_BREAKER_OPEN, t.label).set(1 if t.breaker.open else 0)

    async def begin(
        self, link: SmtpLink, client: ClientInfo, sender: str, params: list[str]
    ) -> tuple[SmtpReply, Transaction | None]:
        if self.cfg.defer_mail:
            # What is known without a backend session is still said at MAIL (and the
            # session refuses REQUIRETLS at MAIL unless backend TLS is required).
            if not self.available:
                raise BackendUnavailable("every backend is in cooldown")
            return _SENDER_OK, DeferredTransaction(self, link, client, sender, params)
        reply, _, txn = await self.open(link, client, sender, params)
        return reply, txn

    async def open(
        self,
        link: SmtpLink,
        client: ClientInfo,
        sender: str,
        params: list[str],
        rcpt: tuple[str, list[str]] | None = None,
    ) -> tuple[SmtpReply, SmtpReply | None, SmtpTransaction | None]:
        """MAIL at the first target that answers, and the first RCPT with it when
        given: MAIL's reply, the RCPT's (None if it got none: see SmtpClient.mail),
        and the open transaction if MAIL was accepted."""
        last_error: Exception | None = None
        targets = self.targets
        if link.target is not None and link.target is not targets[0]:
            # The target this client session already has a session at comes first.
            targets = [link.target, *(t for t in targets if t is not link.target)]
        for target in targets:
            if not target.breaker.allow():
                continue
            try:
                reply, rcpt_reply, session, fit = await self._begin_on(
                    link, target, client, sender, params, rcpt
                )
            except ClientCapReached as e:  # this client's share, at every target
                raise BackendUnavailable(str(e), busy=True, client_cap=True) from None
            except BackendBusy as e:  # up, but no session for us now: not a failure
                last_error = e
                target.busy(e)
                continue
            except BackendRefusedClient as e:
                # This client's values, not the backend's health: no failover (the
                # next target would judge the same values), no breaker.
                link.drop(target)
                log.warning("backend %s refused a client's details: %s", target.url, e)
                raise BackendUnavailable(str(e), refused=True) from None
            except BackendError as e:
                link.drop(target)
                last_error = e
                target.breaker.failure()
                log.warning("backend %s failed: %s", target.url, e)
                continue
            if reply.code == 421:
                target.breaker.failure()
                link.drop(target)
                last_error = BackendLost(f"backend said {reply}")
                continue
            # The gauges change only with a breaker: after a failure (this target's
            # or an earlier one's) or the success that closes one.
            if target.breaker.success() or last_error is not None:
                self._update_gauge()
            if reply.ok:
                txn = SmtpTransaction(target, session, fit.utf8, fit.eight_bit)
                return reply, rcpt_reply, txn
            await reset(session)  # a refused MAIL leaves nothing for the next one
            return reply, None, None
        self._update_gauge()
        raise BackendUnavailable(
            str(last_error or "every backend is in cooldown"),
            busy=isinstance(last_error, BackendBusy),
        )

    async def _begin_on(
        self,
        link: SmtpLink,
        target: Target,
        client: ClientInfo,
        sender: str,
        params: list[str],
        rcpt: tuple[str, list[str]] | None,
    ) -> tuple[SmtpReply, SmtpReply | None, SmtpClient, Fit]:
        for attempt in (0, 1):
            session, reused = await link.session_for(target, client, fresh=attempt > 0)
            try:
                xforward = None
                if not link.identified and self.cfg.xforward and "XFORWARD" in session.extensions:
                    xforward = client_attrs(client)
                # After XCLIENT, whose EHLO may have changed what the session offers.
                fit = fit_params(params, session.extensions)
                if "REQUIRETLS" in params and not self._requiretls_ok(session):
                    # RFC 8689: refuse rather than pass the message on without it.
                    return _own(replies.REQUIRETLS_UNSUPPORTED), None, session, fit
                if not fit.utf8 and not sender.isascii():
                    ascii_sender = ascii_path(sender)
                    if ascii_sender is None:
                        return _own(replies.SMTPUTF8_UNSUPPORTED), None, session, fit
                    sender = ascii_sender
                if rcpt is not None and not fit.utf8 and not rcpt[0].isascii():
                    ascii_rcpt = ascii_path(rcpt[0])
                    if ascii_rcpt is None:
                        # MAIL alone; the RCPT is refused as SmtpTransaction.rcpt would.
                        reply, _ = await session.mail(sender, fit.params, xforward)
                        refused = _own(replies.SMTPUTF8_UNSUPPORTED) if reply.ok else None
                        return reply, refused, session, fit
                    rcpt = (ascii_rcpt, rcpt[1])
                reply, rcpt_reply = await session.mail(sender, fit.params, xforward, rcpt)
                return reply, rcpt_reply, session, fit
            except BackendLost:
                link.drop(target)
                if reused and attempt == 0:
                    continue  # a warm session the backend had already dropped
                raise
        raise AssertionError("unreachable")

    def _requiretls_ok(self, session: SmtpClient) -> bool:
        return (
            self.cfg.tls is config.BackendTls.REQUIRED
            and session.tls_active
            and "REQUIRETLS" in session.extensions
        )

    async def close(self) -> None:
        for t in self.targets:
            await t.pool.close_all()


def client_reply(error: Exception) -> replies.Reply:
    """What the client hears when the backend hop fails mid-transaction (always 4xx)."""
    if isinstance(error, BackendUnavailable):
        if error.refused:
            return replies.BACKEND_REFUSED_CLIENT
        if error.client_cap:
            return replies.BACKEND_CLIENT_CAP
        return replies.BACKEND_BUSY if error.busy else replies.BACKEND_UNAVAILABLE
    if isinstance(error, BackendTimeout):
        return replies.BACKEND_TIMEOUT
    if isinstance(error, BackendBadReply):
        return replies.BACKEND_BAD_REPLY
    return replies.BACKEND_LOST
