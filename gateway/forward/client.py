"""Our own asyncio SMTP/LMTP client for the backend hop.

Why not aiosmtplib: measured on this kind of machine, its two regex passes per
message, its lock and its address parsing cost about 4 ms of CPU per 100 KB
message, ten times a whole message's budget. Here dot-stuffing is one
`bytes.replace`, replies are parsed from one buffer, and every command has a
deadline. Errors are typed so the caller can answer the client with a 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import NoReturn

from gateway import dsn, metrics
from gateway.stream import LineTooLong, Stream, StreamClosed

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100


class BackendError(Exception):
    """Base: the backend hop failed; the client must get a 4xx."""


class BackendLost(BackendError):
    """Connection refused, reset or closed."""


class BackendBusy(BackendLost):
    """The backend is up but takes no session now: a 4xx greeting (its connection
    limit, say), or no session free within the wait (backend.max_sessions). Not a
    failure for the circuit breaker: opening it would turn away all mail, the
    sessions the backend is serving included, because some could not be added."""


class BackendRefusedClient(BackendError):
    """The backend refused what one client brought with it (its XCLIENT or XFORWARD
    attributes, the EHLO with its name). That client's transaction gets a 4xx and
    the session is discarded; the backend itself is healthy, so the circuit breaker
    does not count it, and nothing changes for other clients."""


class ClientCapReached(BackendBusy):
    """This client (its address, or its network) holds as many backend sessions as
    it may (backend.max_sessions_per_client): only its transaction waits for one."""


class BackendTimeout(BackendError):
    """No (complete) reply within the deadline."""


class BackendBadReply(BackendError):
    """The bytes that came back are not an SMTP reply."""


class BackendTlsError(BackendError):
    """TLS was required and could not be established."""


class SmtpReply:
    __slots__ = ("code", "lines")

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __repr__(self) -> str:
        return f"SmtpReply({self.code}, {self.lines!r})"

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines)}"


@functools.lru_cache(maxsize=64)
def _offered(text: str) -> frozenset[str]:
    return frozenset(text.upper().split())


# Postfix's smtpd refuses an XCLIENT or XFORWARD value over 255 octets as sent
# (xtext-encoded: "=" is three octets, "é" six), and an empty one.
MAX_XATTR = 255
UNAVAILABLE = "[UNAVAILABLE]"


@functools.lru_cache(maxsize=4096)
def _xattr(key: str, value: str) -> str:
    """One `NAME=xtext` attribute, `[UNAVAILABLE]` when the encoded value would not
    fit (a client's HELO is its own to choose: it must never make the backend
    refuse the command). Cached, since a client's address and HELO repeat across
    its connections (the port does not, hence per attribute, not per line)."""
    encoded = dsn.xtext(value)
    if not encoded or len(encoded) > MAX_XATTR:
        encoded = UNAVAILABLE
    return f"{key}={encoded}"


def _with_params(command: str, params: list[str]) -> str:
    return f"{command} {' '.join(params)}" if params else command


def _xargs(offered_text: str, attrs: dict[str, str]) -> str:
    """The XCLIENT or XFORWARD arguments for the attributes the backend offers."""
    offered = _offered(offered_text)
    return " ".join([_xattr(k, v) for k, v in attrs.items() if k in offered])


# Per command name: its latency series and, by reply class, its reply counters. Two
# metrics.child() calls per reply were a tenth of the client's share of the calls.
_SERIES: dict[str, tuple[metrics.BufferedHistogram, dict[int, metrics.BufferedCounter]]] = {}


def _new_series(
    name: str,
) -> tuple[metrics.BufferedHistogram, dict[int, metrics.BufferedCounter]]:
    series = _SERIES[name] = (metrics.child(metrics.BACKEND_LATENCY, name), {})
    return series


def _new_class(
    by_class: dict[int, metrics.BufferedCounter], name: str, klass: int
) -> metrics.BufferedCounter:
    """Created on first use, so /metrics shows only the classes a backend answered."""
    counter = by_class[klass] = metrics.child(metrics.BACKEND_REPLIES, name, f"{klass}xx")
    return counter


class SmtpClient:
    """One backend session. Not safe for concurrent use: one transaction at a time."""

    def __init__(
        self,
        stream: Stream,
        *,
        command_timeout: float,
        data_timeout: float,
        lmtp: bool = False,
    ) -> None:
        self.stream = stream
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.lmtp = lmtp
        self.extensions: dict[str, str] = {}
        self.last_used = time.monotonic()
        self.broken = False
        # Told once when this session closes (the pool counts the open ones).
        self.on_close: Callable[[SmtpClient], None] | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        helo: str,
        connect_timeout: float,
        command_timeout: float,
        data_timeout: float,
        lmtp: bool = False,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        server_name: str | None = None,
    ) -> SmtpClient:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, stream = await loop.create_connection(Stream, host, port)
        except TimeoutError:
            metrics.child(metrics.BACKEND_CONNECTS, "timeout").inc()
            raise BackendTimeout(f"connect to {host}:{port} timed out") from None
        except OSError as e:
            metrics.child(metrics.BACKEND_CONNECTS, "refused").inc()
            raise BackendLost(f"connect to {host}:{port} failed: {e.strerror or e}") from None
        client = cls(stream, command_timeout=command_timeout, data_timeout=data_timeout, lmtp=lmtp)
        try:
            # The greeting within the connect timeout, not the command timeout: a
            # backend that accepts and then says nothing (Postfix throttling its
            # smtpd) is as unavailable as one that refuses, and a client waits.
            greeting = await client._timed("greeting", connect_timeout)
            if greeting.code != 220:
                busy = 400 <= greeting.code < 500
                raise (BackendBusy if busy else BackendLost)(f"backend greeting: {greeting}")
            await client.ehlo(helo)
            if tls is not None:
                if "STARTTLS" in client.extensions:
                    await client.starttls(tls, server_name or host)
                    await client.ehlo(helo)
                elif tls_required:
                    raise BackendTlsError("backend does not offer STARTTLS")
        except BaseException as e:
            client.close()
            result = "busy" if isinstance(e, BackendBusy) else "failed"
            metrics.child(metrics.BACKEND_CONNECTS, result).inc()
            raise
        metrics.child(metrics.BACKEND_CONNECTS, "ok").inc()
        return client

    @property
    def closed(self) -> bool:
        t = self.stream.transport
        return self.broken or t is None or t.is_closing() or self.stream.at_eof

    @property
    def reusable(self) -> bool:
        """Open, and every reply read: fit to go back to (or come out of) the pool.
        Data from an idle session is the backend closing it (421) or noise."""
        return not self.closed and not self.stream.pending

    @property
    def tls_active(self) -> bool:
        return self.stream.tls_object is not None

    def quit_now(self) -> None:
        """QUIT without waiting for the reply, and close: for a session nobody
        waits on (a spare past its idle time, one whose client session ended)."""
        if not self.closed and not self.stream.pending:
            self.stream.write(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        self.broken = True
        self.stream.close()
        told, self.on_close = self.on_close, None
        if told is not None:
            told(self)

    # -- wire ---------------------------------------------------------------
    async def _timed(self, name: str, limit: float | None = None) -> SmtpReply:
        """Read one reply within the deadline; count and time it.

        The reply is parsed here, line by line from the stream's buffer, rather than
        in a reader coroutine below: each wait for the backend resumes through every
        frame above it, and this is the deepest point of the session.
        """
        start = time.perf_counter()
        stream = self.stream
        stream.set_deadline(limit or self.command_timeout)
        lines: list[str] = []
        code = 0
        try:
            while True:
                raw = stream.take_line(MAX_REPLY_LINE)
                while raw is None:
                    await stream.wait_line(MAX_REPLY_LINE)
                    raw = stream.take_line(MAX_REPLY_LINE)
                if (
                    len(raw) < 3
                    or not raw[:3].isdigit()
                    or (len(raw) > 3 and raw[3:4] not in b" -")
                ):
                    raise BackendBadReply(f"malformed reply line {raw[:40]!r}")
                this = int(raw[:3])
                if lines and this != code:
                    raise BackendBadReply("reply code changed inside a multi-line reply")
                code = this
                lines.append(raw[4:].decode("utf-8", "replace"))
                if raw[3:4] != b"-":
                    break
                if len(lines) > MAX_REPLY_LINES:
                    raise BackendBadReply("reply has too many lines")
        except LineTooLong:
            self._failed(name)
            raise BackendBadReply("reply line too long") from None
        except StreamClosed:
            self._failed(name)
            raise BackendLost("backend closed the connection") from None
        except TimeoutError:
            self._failed(name)
            stream.abort()
            raise BackendTimeout(f"backend did not answer {name}") from None
        except BackendError:
            self._failed(name)
            raise
        klass = code // 100
        # What the command may get (RFC 5321 4.3.2): DATA 354, the others 2xx; any
        # 4xx or 5xx. Anything else means the backend is not answering what we asked,
        # most likely because it sent a reply nobody asked for and every reply since
        # is one behind: a 250 read as DATA's answer would be taken for the message's
        # acceptance.
        if klass != 4 and klass != 5 and (code != 354 if name == "data" else klass != 2):
            self._failed(name)
            self.close()
            raise BackendBadReply(f"backend answered {name} with {code}")
        if code == 421:
            self.broken = True  # the backend is closing this session (RFC 5321 3.8)
        # The deadline is left as it is: nothing reads an idle backend session, and
        # the next command sets its own.
        series = _SERIES.get(name) or _new_series(name)
        series[0].observe(time.perf_counter() - start)
        (series[1].get(klass) or _new_class(series[1], name, klass)).inc()
        self.last_used = time.monotonic()
        return SmtpReply(code, lines)

    def _failed(self, name: str) -> None:
        self.broken = True
        metrics.child(metrics.BACKEND_REPLIES, name, "error").inc()

    def command(self, name: str, line: str) -> Coroutine[None, None, SmtpReply]:
        """Send one command; await the result for its reply. A plain function (the
        write happens at the call) so that waiting for the reply costs no extra frame."""
        if self.closed or self.stream.pending:
            self._out_of_step(name)
        self.stream.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self._timed(name)

    def _out_of_step(self, name: str) -> NoReturn:
        """Called before a write that expects replies, when the session is closed or
        has bytes nobody read. Such a byte is a reply to nothing we asked (or the
        start of an unannounced close), and reading on would pair each later reply
        with the wrong command: the session ends here."""
        if self.closed:
            raise BackendLost("backend connection is closed")
        self._failed(name)
        self.close()
        raise BackendBadReply("backend sent a reply that nothing asked for")

    # -- commands ---------------------------------------------------------------
    async def ehlo(self, helo: str, refused: type[BackendError] = BackendLost) -> None:
        """EHLO (LHLO), or HELO if EHLO is refused; `refused` is raised if both are."""
        verb = "LHLO" if self.lmtp else "EHLO"
        reply = await self.command("ehlo", f"{verb} {helo}")
        if not reply.ok:
            if self.lmtp:
                raise refused(f"backend refused LHLO: {reply}")
            reply = await self.command("helo", f"HELO {helo}")
            if not reply.ok:
                raise refused(f"backend refused HELO: {reply}")
            self.extensions = {}
            return
        ext: dict[str, str] = {}
        for line in reply.lines[1:]:
            key, _, val = line.partition(" ")
            ext[key.upper()] = val
        self.extensions = ext

    async def starttls(self, ctx: ssl.SSLContext, server_name: str) -> None:
        reply = await self.command("starttls", "STARTTLS")
        if reply.code != 220:
            raise BackendTlsError(f"backend refused STARTTLS: {reply}")
        try:
            async with asyncio.timeout(self.command_timeout):
                await self.stream.start_tls(ctx, server_side=False, server_hostname=server_name)
        except (OSError, ssl.SSLError, TimeoutError, StreamClosed) as e:
            self.close()
            raise BackendTlsError(f"TLS handshake with backend failed: {e}") from None

    async def xclient(self, attrs: dict[str, str], helo: str) -> None:
        """Tell the backend who the client is (Postfix XCLIENT), then EHLO as it.

        Postfix answers with a new 220 greeting, some servers with 250; either way
        the session is reset, so EHLO again, with the client's own name: the EHLO
        that follows XCLIENT is what Postfix logs, checks and writes into its
        Received header (it takes precedence over the HELO attribute). Once done,
        the identity stays on this connection: Postfix judges XCLIENT against the
        new client's address and stops offering it (forward/pool.py).
        BackendRefusedClient if the backend refuses either command.
        """
        args = _xargs(self.extensions.get("XCLIENT", ""), attrs)
        if not args:
            return
        reply = await self.command("xclient", f"XCLIENT {args}")
        if not reply.ok:
            raise BackendRefusedClient(f"backend refused XCLIENT: {reply}")
        await self.ehlo(helo, refused=BackendRefusedClient)

    async def mail(
        self,
        sender: str,
        params: list[str],
        xforward: dict[str, str] | None = None,
        rcpt: tuple[str, list[str]] | None = None,
    ) -> tuple[SmtpReply, SmtpReply | None]:
        """MAIL, preceded by XFORWARD and followed by the first RCPT when given: one
        write and one round trip when the backend offers PIPELINING (RFC 2920 lets all
        three share a group), else one by one.

        The second reply is the RCPT's, or None when MAIL was refused: an RCPT sent
        along then only earned a 503, which is read here and dropped. After a 421 to
        MAIL nothing more is read: the backend is closing, and so must the caller.
        """
        mail = _with_params(f"MAIL FROM:<{sender}>", params)
        xf = self.xforward_line(xforward) if xforward else None
        rcpt_line = self._rcpt_line(*rcpt) if rcpt else None
        if "PIPELINING" in self.extensions:
            if self.closed or self.stream.pending:
                self._out_of_step("mail")
            batch = [line for line in (xf, mail, rcpt_line) if line is not None]
            wire = "".join([f"{line}\r\n" for line in batch])
            self.stream.write(wire.encode("utf-8", "surrogateescape"))
            if xf is not None:
                self._xforward_ok(await self._timed("xforward"))
            reply = await self._timed("mail")
            if rcpt_line is None or reply.code == 421:
                return reply, None
            rcpt_reply = await self._timed("rcpt")
            return reply, (rcpt_reply if reply.ok else None)
        if xf is not None:
            self._xforward_ok(await self.command("xforward", xf))
        reply = await self.command("mail", mail)
        if rcpt_line is None or not reply.ok:
            return reply, None
        return reply, await self.command("rcpt", rcpt_line)

    @staticmethod
    def _xforward_ok(reply: SmtpReply) -> None:
        if not reply.ok:
            raise BackendRefusedClient(f"backend refused XFORWARD: {reply}")

    def xforward_line(self, attrs: dict[str, str]) -> str | None:
        args = _xargs(self.extensions.get("XFORWARD", ""), attrs)
        return f"XFORWARD {args}" if args else None

    def rcpt(self, rcpt: str, params: list[str]) -> Coroutine[None, None, SmtpReply]:
        return self.command("rcpt", self._rcpt_line(rcpt, params))

    def _rcpt_line(self, rcpt: str, params: list[str]) -> str:
        """RCPT TO, without the DSN parameters if this session does not offer DSN (it
        would refuse them: see gateway/dsn.py)."""
        return _with_params(
            f"RCPT TO:<{rcpt}>", dsn.for_backend(params, self.extensions, dsn.RCPT_KEYS)
        )

    async def data(self, wire: bytes, recipients: int = 1, prefix: bytes = b"") -> list[SmtpReply]:
        """Send DATA and the message; one reply for SMTP, one per recipient for LMTP.

        `wire` is already dot-stuffed with CRLF line ends (see smtp/data.py), and
        `prefix` (our header fields) goes in front of it; only the terminating dot
        is added here. The three go out in one vectored write, without a copy.
        """
        reply = await self.command("data", "DATA")
        if reply.code != 354:
            return [reply]  # refused (_timed lets nothing else by)
        if self.stream.pending:  # nothing may follow the 354 before our message
            self._out_of_step("data")
        self.stream.writelines([prefix, wire, b".\r\n"])
        try:
            await self.stream.drain()
        except StreamClosed:
            return [await self._early_refusal()] * (recipients if self.lmtp else 1)
        replies = [await self._timed("data_end", self.data_timeout)]
        if self.lmtp:
            for _ in range(recipients - 1):
                replies.append(await self._timed("data_end", self.data_timeout))
        return replies

    async def _early_refusal(self) -> SmtpReply:
        """The reply of a backend that closed while the message was still going out.

        Some refuse a message before its end (too big, say), reply and close. That
        reply, when it arrived whole, is the answer: a permanent refusal reported as
        a lost connection would have the client retry, for days, a message this
        backend will never take. A positive one cannot be: the message was not all
        sent."""
        self.broken = True
        reply = await self._timed("data_end")  # BackendLost if no whole reply came
        if reply.ok:
            raise BackendLost("backend closed the connection during DATA")
        return reply

    async def rset(self) -> bool:
        try:
            return (await self.command("rset", "RSET")).ok
        except BackendError:
            return False

    async def quit(self) -> None:
        with contextlib.suppress(BackendError):
            await self.command("quit", "QUIT")
        self.close()
