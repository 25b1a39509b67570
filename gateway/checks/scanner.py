"""The shared base of the content scanners (clamd, Rspamd): external programs
asked about the message at DATA, whose answers are symbols like any check's.

What every scanner needs and this module does once:

- the message as the recipients will see it (`Context.message`: unstuffed);
- a size bound (`max_size`): a larger message is not sent, `<name>.too_big`;
- a bound on scans in flight per process (`max_concurrent`): beyond it a scan
  waits for a slot, within its deadline, so a slow scanner holds at most that
  many sessions' worth of memory and sockets and never the whole gateway;
- the runner's deadline (`Context.deadline`, set from `budget` = `timeout`):
  connecting, waiting for a slot and the scanner's answer all end there, with
  `<name>.timeout`; a refused, reset or garbled conversation is
  `<name>.unavailable`. So failing open or closed is the policy's choice, as
  with the rate-limit store (`ratelimit.unavailable`);
- a small pool of stream connections kept for reuse (`keep_connections`);
- metrics: the scanner's latency, its errors by kind; the symbols themselves are
  counted by the runner (smtp_gateway_check_results_total) like every check's;
- one `ScanFacts` entry per scanner in `Facts.scans` (the verdict and its detail,
  a signature name say), which the transaction's log line and `smtp-gateway
  check` show. Never a metric label, never reply text.

A scanner subclasses `Scanner`, names its options type (a `ScannerOptions`
subclass) and implements `scan(ctx, message, conn)`.

DATA-stage checks run once per transaction, after the message is read and
before the backend gets it (smtp/message.py), whatever the number of
recipients: so a message is scanned once.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self

from pydantic import Field, field_validator

from gateway import metrics
from gateway.config import Strict
from gateway.context import Context
from gateway.facts import ScanFacts
from gateway.vocab import Stage

log = logging.getLogger("gateway.scanner")

Scheme = Literal["tcp", "unix", "http"]

# The kinds of scanner error, a closed set (the `kind` label).
ERROR_KINDS = ("unavailable", "timeout", "protocol")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a scanner listens: a TCP host and port (tcp://, http://) or a Unix
    socket's path (unix:)."""

    scheme: Scheme
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


# sun_path is 108 bytes on Linux, the terminating NUL included.
_MAX_UNIX_PATH = 107


def parse_endpoint(
    value: str, schemes: frozenset[str] = frozenset({"tcp", "unix", "http"})
) -> Endpoint:
    """`tcp://HOST:PORT`, `unix:/PATH` (or `unix:///PATH`), `http://HOST:PORT`.

    Raises ValueError with the forms allowed (`schemes`): as a field validator's
    error, pydantic names the key (checks.clamav.endpoint: ...).
    """
    forms = {"tcp": "tcp://HOST:PORT", "unix": "unix:/PATH", "http": "http://HOST:PORT"}
    use = " or ".join(forms[s] for s in ("tcp", "unix", "http") if s in schemes)
    scheme, sep, rest = value.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in schemes:
        raise ValueError(f"{value!r}: use {use}")
    if scheme == "unix":
        path = rest[2:] if rest.startswith("///") else rest
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"{value!r}: a Unix socket needs an absolute path (unix:/PATH)")
        if len(path.encode()) > _MAX_UNIX_PATH:
            raise ValueError(f"{value!r}: a Unix socket path is at most {_MAX_UNIX_PATH} bytes")
        return Endpoint("unix", path=path)
    if not rest.startswith("//"):
        raise ValueError(f"{value!r}: use {use}")
    hostport = rest[2:]
    if scheme == "http":
        hostport = hostport.removesuffix("/")
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port_s = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_s = hostport.rpartition(":")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536 or "/" in host:
        raise ValueError(f"{value!r}: use {use} (a host and a port from 1 to 65535)")
    return Endpoint(scheme, host=host, port=int(port_s))  # type: ignore[arg-type]


class ScannerOptions(Strict):
    """Options every scanner has (`checks.<scanner>`); a scanner's own options
    type subclasses this one and may narrow `endpoint_schemes`."""

    endpoint_schemes: ClassVar[frozenset[str]] = frozenset({"tcp", "unix", "http"})

    enabled: bool = False
    endpoint: str
    # Seconds for one scan: waiting for a slot, connecting, sending, the answer.
    # This check's time budget (in place of the policy's check_timeout).
    timeout: Annotated[float, Field(gt=0)] = 10.0
    # Bytes: a larger message is not sent to the scanner (`<name>.too_big`). Counted
    # as limits.max_message_size counts (the CRLF that ends the last line not
    # included), so the two set equal leave no message unscanned.
    max_size: Annotated[int, Field(gt=0)] = 25 * 1024 * 1024
    # Scans in flight at once per worker process; more wait for a slot (within timeout).
    max_concurrent: Annotated[int, Field(ge=1)] = 8
    # Idle connections kept open for the next scan (0: a new connection per scan).
    keep_connections: Annotated[int, Field(ge=0)] = 4
    # Scan messages from trusted_networks too (default: they skip the scan).
    scan_trusted: bool = False

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parse_endpoint(v, cls.endpoint_schemes)
        return v

    @functools.cached_property
    def address(self) -> Endpoint:
        """The parsed endpoint, once per options object (not once per scan)."""
        return parse_endpoint(self.endpoint, self.endpoint_schemes)


class ScannerUnavailable(Exception):
    """The scanner could not be reached or dropped the conversation."""


class ScannerRefused(ScannerUnavailable):
    """The scanner answered that it will not scan this message (clamd's ERROR
    replies): unavailable all the same, but never tried again on a new connection,
    which would only send the message a second time to hear the same answer."""


class ScannerProtocolError(Exception):
    """The scanner answered something we do not understand (the connection is
    then out of step and discarded)."""


class Connection:
    """One stream connection to a scanner. `uses` counts the scans it served
    before (0: new); a scanner protocol may keep its own per-connection state in
    `state` (clamd: the IDSESSION request counter)."""

    __slots__ = ("reader", "state", "uses", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.uses = 0
        self.state: dict[str, Any] = {}

    @property
    def usable(self) -> bool:
        """Still open at our end, the peer has not closed it, and it sent nothing
        while it was idle: bytes waiting there are no answer to anything we asked
        (a scanner out of step, or a hostile one numbering a verdict in advance),
        and would be read as the next message's."""
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and not getattr(self.reader, "_buffer", b"")
        )

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


# A reply line from a scanner longer than this is a protocol error (StreamReader's
# limit: a scanner cannot make us buffer without bound).
READ_LIMIT = 64 * 1024


class ConnectionPool:
    """Connections to one endpoint: at most `keep` idle ones kept for reuse, a
    broken one discarded. Connecting is bounded by the caller's deadline (the
    scan's `asyncio.timeout_at`)."""

    def __init__(self, endpoint: Endpoint, keep: int, scanner: str) -> None:
        self.endpoint = endpoint
        self.keep = keep
        self.scanner = scanner
        self.idle: list[Connection] = []
        self.closed = False
        self.opened = 0  # connections opened over the pool's life (tests, metrics)

    async def acquire(self) -> Connection:
        """An idle connection that still looks open, else a new one."""
        while self.idle:
            conn = self.idle.pop()
            if conn.usable:
                metrics.child(metrics.SCANNER_CONNECTIONS, self.scanner, "reused").inc()
                return conn
            conn.close()
        conn = await self.connect()
        self.opened += 1
        metrics.child(metrics.SCANNER_CONNECTIONS, self.scanner, "opened").inc()
        return conn

    async def connect(self) -> Connection:
        """A new connection to the endpoint (tests put a fake scanner here)."""
        ep = self.endpoint
        try:
            if ep.scheme == "unix":
                reader, writer = await asyncio.open_unix_connection(ep.path, limit=READ_LIMIT)
            else:
                reader, writer = await asyncio.open_connection(ep.host, ep.port, limit=READ_LIMIT)
        except OSError as e:
            raise ScannerUnavailable(f"cannot connect to {ep}: {e.strerror or e}") from None
        return Connection(reader, writer)

    def release(self, conn: Connection) -> None:
        """A connection whose conversation ended cleanly: kept, or closed if the
        pool is full or closed."""
        conn.uses += 1
        if not self.closed and len(self.idle) < self.keep and conn.usable:
            self.idle.append(conn)
        else:
            conn.close()

    def drop_idle(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def close(self) -> None:
        """No more reuse: idle connections closed now, busy ones when released."""
        self.closed = True
        self.drop_idle()


class ScanResult(NamedTuple):
    """What `Scanner.scan` returns: the symbols to emit, the verdict in one word
    for the log and `check` (clean, infected, spam, ...), and a detail (a
    signature name, a score) for the same places only."""

    symbols: tuple[str, ...]
    verdict: str
    detail: str = ""


class _Shared:
    """What every configured copy of one scanner shares: the connection pool of the
    current endpoint and the slots of the current max_concurrent."""

    def __init__(self) -> None:
        self.pool: ConnectionPool | None = None
        self.slots: asyncio.Semaphore | None = None
        self.max_concurrent = 0


def content_size(message: bytes) -> int:
    """A message's size as `max_size` counts it: as limits.max_message_size does,
    without the CRLF that ends its last line. Counted with it, a message the gateway
    took at exactly its size limit was 2 bytes over a scanner's equal `max_size`,
    and went unscanned."""
    return len(message) - 2 if message.endswith(b"\r\n") else len(message)


def unscanned_gap(name: str, max_size: int, max_message_size: int) -> str | None:
    """What `config check` says when a scanner's `max_size` is below the largest
    message the gateway takes and the policy accepts what is too big to scan."""
    if max_size >= max_message_size:
        return None
    return (
        f"checks.{name}.max_size ({max_size}) is below limits.max_message_size"
        f" ({max_message_size}) and {name}.too_big is accept: messages in between are"
        f" delivered without the {name} scan"
    )


def scanner_symbols(name: str) -> frozenset[str]:
    """The symbols the base emits for scanner `name`."""
    return frozenset({f"{name}.unavailable", f"{name}.timeout", f"{name}.too_big"})


class Scanner:
    """Base of a content-scanner check at DATA.

    Subclasses set `name`, `symbols` (their own | scanner_symbols(name)),
    `options_type`, and implement `scan`.

    Trusted networks: the runner skips a check for a trusted client when its
    class says `reputation = True`, a class-wide constant of the check contract.
    A scanner is no reputation or sender-authentication check, and whether a
    trusted client's mail is scanned is an option (`scan_trusted`), so the class
    says `reputation = False` and `run` skips the scan itself: by default a
    trusted client (trusted_networks: loopback, your own hosts, like Postfix's
    mynetworks) is not scanned, as the rest of the gateway trusts it;
    `scan_trusted: true` scans it too (an infected workstation inside the
    network is the case for it). A skipped scan leaves `skipped` in the facts.
    Allow-listed clients (DNSBL allow zones) are scanned unless the policy's
    `allowlist_skips` names the scanner: an allow list vouches for a sender's
    reputation, not for what it forwards.
    """

    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    symbols: ClassVar[frozenset[str]]
    reputation: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset()
    options_type: ClassVar[type[ScannerOptions]]
    pool_type: ClassVar[type[ConnectionPool]] = ConnectionPool

    def __init__(self) -> None:
        self._shared = _Shared()
        self.options: ScannerOptions = self.options_type.model_validate({})
        self.budget: float | None = self.options.timeout
        self.pool: ConnectionPool | None = None
        self.slots: asyncio.Semaphore | None = None
        self._attach(self)

    def configured(self, options: ScannerOptions) -> Self:
        """This scanner under `options`: a new object; the pool (same endpoint) and
        the slots (same max_concurrent) carry over, so a reload neither drops kept
        connections nor lets more scans run at once than configured."""
        new = copy.copy(self)
        new.options = options
        new.budget = options.timeout
        self._attach(new)
        return new

    def _attach(self, new: Scanner) -> None:
        shared, opts = self._shared, new.options
        endpoint = opts.address
        pool = shared.pool
        if pool is None or pool.endpoint != endpoint:
            if pool is not None:
                pool.close()
            pool = shared.pool = self.pool_type(endpoint, opts.keep_connections, self.name)
        pool.keep = opts.keep_connections
        if shared.slots is None or shared.max_concurrent != opts.max_concurrent:
            shared.slots = asyncio.Semaphore(opts.max_concurrent)
            shared.max_concurrent = opts.max_concurrent
        new.pool, new.slots = pool, shared.slots
        for kind in ERROR_KINDS:  # exported as 0 from the start, so rate() sees the first
            metrics.child(metrics.SCANNER_ERRORS, self.name, kind)

    def close(self) -> None:
        if self._shared.pool is not None:
            self._shared.pool.close()

    # -- per message -------------------------------------------------------------
    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        if ctx.trusted and not self.options.scan_trusted:
            ctx.facts.scans += (ScanFacts(self.name, "skipped", "trusted client"),)
            return ()
        message = ctx.message
        if message is None:
            return ()
        size = content_size(message)
        if size > self.options.max_size:
            sym = f"{self.name}.too_big"
            detail = f"{size} bytes > max_size {self.options.max_size}"
            ctx.facts.scans += (ScanFacts(self.name, "too_big", detail, (sym,)),)
            return (sym,)
        return self._scan(ctx, message)

    async def _scan(self, ctx: Context, message: bytes) -> tuple[str, ...]:
        assert self.pool is not None and self.slots is not None  # configured
        kind = ""
        started: float | None = None
        try:
            async with asyncio.timeout_at(ctx.deadline):
                async with self.slots:
                    started = time.perf_counter()
                    result = await self._attempt(ctx, message, self.pool)
        except TimeoutError:
            kind, result = "timeout", ScanResult((f"{self.name}.timeout",), "timeout")
        except ScannerUnavailable as e:
            kind, result = "unavailable", ScanResult((f"{self.name}.unavailable",), "unavailable")
            result = result._replace(detail=str(e))
        except ScannerProtocolError as e:
            kind = "protocol"
            result = ScanResult((f"{self.name}.unavailable",), "unavailable", str(e))
        if started is not None:
            metrics.child(metrics.SCAN_SECONDS, self.name).observe(time.perf_counter() - started)
        if kind:
            metrics.child(metrics.SCANNER_ERRORS, self.name, kind).inc()
            log.warning(
                "%s scan failed (%s) for session %s: %s",
                self.name,
                kind,
                ctx.session_id,
                result.detail or "no answer by the deadline",
            )
        ctx.facts.scans += (ScanFacts(self.name, result.verdict, result.detail, result.symbols),)
        return result.symbols

    async def _attempt(self, ctx: Context, message: bytes, pool: ConnectionPool) -> ScanResult:
        """One scan over a pooled connection. A kept connection the scanner has
        closed meanwhile (its idle timeout) fails at once: then once more over a
        new one. Any failure, or a cancellation at the deadline, discards the
        connection: it may be mid-conversation."""
        for _ in range(2):
            conn = await pool.acquire()
            reused = conn.uses > 0
            try:
                result = await self.scan(ctx, message, conn)
            except (ValueError, OverflowError) as e:
                # A number past what Python converts (a 5,000-digit length or score):
                # an answer not understood, like any other.
                conn.close()
                raise ScannerProtocolError(f"answer not understood: {_describe(e)}"[:200]) from None
            except (ConnectionError, asyncio.IncompleteReadError, ScannerUnavailable) as e:
                conn.close()
                if reused and not isinstance(e, ScannerRefused):
                    # Closed while kept (the scanner's idle timeout, a restart); the
                    # others kept as long are likely closed too: start afresh.
                    pool.drop_idle()
                    continue
                if isinstance(e, ScannerUnavailable):
                    raise
                raise ScannerUnavailable(_describe(e)) from None
            except BaseException:
                conn.close()
                raise
            pool.release(conn)
            return result
        raise ScannerUnavailable("connection closed by the scanner")

    async def scan(self, ctx: Context, message: bytes, conn: Connection) -> ScanResult:
        """Scan `message` (unstuffed, at most max_size bytes) over `conn`.

        Raise ScannerProtocolError for an answer not understood, and
        ScannerUnavailable for a conversation cut short or a scanner that says
        it cannot scan (ConnectionError and IncompleteReadError may also pass
        through): on a kept connection, which the scanner may have closed while
        it was idle, the base then tries once more on a new one. All become
        `<name>.unavailable` and the connection is discarded. Leave
        time to the base (the scan runs under the deadline). Return normally only
        with the connection at a clean point, or closed (`conn.close()`): an open
        one is kept for reuse."""
        raise NotImplementedError


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed by the scanner mid-answer"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
