"""Rspamd: the message and its envelope sent to Rspamd's normal worker
(`POST /checkv2`), its action made a symbol.

    reject           -> rspamd.reject
    soft reject      -> rspamd.soft_reject
    rewrite subject  -> rspamd.rewrite_subject
    add header       -> rspamd.add_header
    greylist         -> rspamd.greylist
    no action        -> (none)
    any other action Rspamd is configured with (discard, quarantine, ...)
                     -> rspamd.custom_action
    skipped by Rspamd's settings -> (none)

The policy decides what each means (policies/default.yaml); the score, the
strongest symbols and the header changes go to the facts (`Facts.rspamd`):
the transaction's log line and `smtp-gateway check` show them, headers.compose
writes our X-Spam-* fields from them and applies the changes Rspamd asks for
(its reply's `milter` block: fields to add and remove, the rewritten subject)
as far as the policy allows: `apply_milter_headers`, only field names matching
`milter_header_names`, `rewrite_subject`. Whatever it asks, a field in our name
(Authentication-Results with our authserv-id, our tag fields, our X-Spam-*) is
never added and never removed.

Connections: HTTP/1.1 and kept when the server allows it. Rspamd's own normal
worker (3.x) answers `Connection: close` to every request, so with it each scan
opens one; a balancer in front of it (HAProxy, nginx) may keep ours.

The reply is bounded (rspamd_protocol.MAX_REPLY) and parsed off the event loop
when large (a reply lists every URL host Rspamd found in the message).
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import re
from collections.abc import Callable
from typing import Annotated, ClassVar

from pydantic import Field, field_validator

from gateway.address import Address
from gateway.checks.rspamd_protocol import (
    MAX_REPLY,
    Envelope,
    HttpResponse,
    ResponseParser,
    RspamdProtocolError,
    RspamdReply,
    build_request,
    parse_reply,
)
from gateway.checks.scanner import (
    Connection,
    Scanner,
    ScannerOptions,
    ScannerProtocolError,
    ScannerUnavailable,
    ScanResult,
    scanner_symbols,
)
from gateway.context import Context
from gateway.dns import ascii_name
from gateway.facts import HeaderEdits, RspamdFacts
from gateway.net import plain_ip

# Rspamd's action -> our symbol ("no action": none).
SYMBOL_OF_ACTION = {
    "reject": "rspamd.reject",
    "soft reject": "rspamd.soft_reject",
    "rewrite subject": "rspamd.rewrite_subject",
    "add header": "rspamd.add_header",
    "greylist": "rspamd.greylist",
}
CUSTOM_ACTION = "rspamd.custom_action"

# Bytes of message written at a time (views of it: the transport's buffer holds at
# most about this much of a copy).
CHUNK = 64 * 1024
# A reply larger than this is parsed in a thread (json.loads of a few MB takes tens
# of milliseconds, every other session's time on the loop).
THREAD_REPLY = 256 * 1024

_PATTERN = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")


class RspamdOptions(ScannerOptions):
    """Spam scanning by Rspamd (its HTTP protocol, /checkv2), once per message at DATA."""

    endpoint_schemes: ClassVar[frozenset[str]] = frozenset({"http", "unix"})

    # http://HOST:PORT (the normal worker's bind_socket) or unix:/PATH.
    endpoint: str = "http://127.0.0.1:11333"
    # Bytes: a larger message is not sent (rspamd.too_big). Spam is small, and
    # rmilter, Rspamd's old MTA connector, skipped messages above 10 MB too.
    max_size: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    # Apply the header changes of Rspamd's `milter` block (fields it adds and
    # removes: its milter_headers module, configured on the Rspamd side).
    apply_milter_headers: bool = True
    # The field names those changes may touch (shell patterns, any case). A name
    # outside them is ignored both ways, as is any field in our name.
    milter_header_names: list[str] = Field(
        default_factory=lambda: [
            "X-Spam*",
            "X-Spamd-*",
            "X-Rspamd-*",
            "X-Virus*",
            "Authentication-Results",
        ]
    )
    # Replace the Subject with Rspamd's when its action is `rewrite subject`.
    rewrite_subject: bool = True
    # Our X-Spam-Status, X-Spam-Score and X-Spam-Action fields on every scanned
    # message (and such fields from the client removed, whatever it is).
    spam_headers: bool = True

    @field_validator("milter_header_names")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not _PATTERN.fullmatch(p):
                raise ValueError(f"{p!r}: a field name, or a pattern of one (* and ?)")
        return v


def allowed(name: str, patterns: list[str]) -> bool:
    return _matcher(tuple(patterns))(name) is not None


@functools.lru_cache(maxsize=8)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """One case-insensitive expression for a policy's patterns, made once per policy
    (not a fnmatch per field and pattern of every message)."""
    either = "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) or "(?!)"
    return re.compile(either, re.IGNORECASE).match


def smtp_address(addr: Address | None) -> str:
    """An envelope address as Rspamd's SMTP-address parser takes it: a UTF-8 domain
    as its A-labels (an ASCII local part then makes a valid ASCII address; Rspamd
    3.4 ignores an address with a UTF-8 local part whatever we do)."""
    if addr is None or addr.is_null:
        return ""
    if addr.domain and not addr.domain.isascii() and not addr.literal:
        return str(Address(addr.local, ascii_name(addr.domain), addr.quoted))
    return str(addr)


def envelope(ctx: Context) -> Envelope:
    return Envelope(
        client_ip=plain_ip(ctx.client_ip),
        helo=ctx.helo,
        mail_from=smtp_address(ctx.mail_from),
        recipients=tuple(smtp_address(r) for r in ctx.recipients),
        queue_id=ctx.session_id,
        # The gateway offers no SMTP AUTH: there is never a user to name.
        user=None,
        tls_version=ctx.tls_version,
        tls_cipher=ctx.tls_cipher,
    )


class RspamdCheck(Scanner):
    name: ClassVar[str] = "rspamd"
    symbols: ClassVar[frozenset[str]] = frozenset(
        {*SYMBOL_OF_ACTION.values(), CUSTOM_ACTION}
    ) | scanner_symbols("rspamd")
    options_type: ClassVar[type[ScannerOptions]] = RspamdOptions

    async def scan(self, ctx: Context, message: bytes, conn: Connection) -> ScanResult:
        opts = self.options
        assert isinstance(opts, RspamdOptions)
        ep = opts.address
        host = str(ep).removeprefix("http://") if ep.scheme == "http" else "localhost"
        w = conn.writer
        head = build_request(host, envelope(ctx), len(message))
        if len(message) <= CHUNK:
            w.write(head + message)  # one write, one system call: most mail
        else:
            w.write(head)
            view = memoryview(message)
            for start in range(0, len(view), CHUNK):
                w.write(view[start : start + CHUNK])
                await w.drain()
        await w.drain()
        response = await self._response(conn)
        if not response.keep_alive:
            conn.close()  # Rspamd's normal worker: one request per connection
        if response.status != 200:
            raise ScannerProtocolError(
                f"rspamd answered HTTP {response.status} {response.reason}: " + _show(response.body)
            )
        try:
            if len(response.body) > THREAD_REPLY:
                reply = await asyncio.to_thread(parse_reply, response.body)
            else:
                reply = parse_reply(response.body)
        except RspamdProtocolError as e:
            raise ScannerProtocolError(str(e)) from None
        return self._verdict(ctx, reply, opts)

    async def _response(self, conn: Connection) -> HttpResponse:
        parser = ResponseParser(MAX_REPLY)
        got = 0
        try:
            while True:
                data = await conn.reader.read(CHUNK)
                if not data:
                    if got == 0:
                        # Closed before a byte of answer: a kept connection the server
                        # dropped meanwhile is tried again on a new one (scanner.py).
                        raise ScannerUnavailable("connection closed by rspamd")
                    return parser.eof()
                got += len(data)
                response = parser.feed(data)
                if response is not None:
                    return response
        except RspamdProtocolError as e:
            raise ScannerProtocolError(str(e)) from None

    def _verdict(self, ctx: Context, reply: RspamdReply, opts: RspamdOptions) -> ScanResult:
        if reply.skipped:
            symbols: tuple[str, ...] = ()
        elif reply.action in SYMBOL_OF_ACTION:
            symbols = (SYMBOL_OF_ACTION[reply.action],)
        elif reply.action == "no action":
            symbols = ()
        else:
            symbols = (CUSTOM_ACTION,)
        edits = HeaderEdits()
        if opts.apply_milter_headers:
            names = opts.milter_header_names
            edits = HeaderEdits(
                add=tuple((n, v) for n, v in reply.add_headers if allowed(n, names)),
                remove=tuple((n, k) for n, k in reply.remove_headers if allowed(n, names)),
            )
        if opts.rewrite_subject and reply.action == "rewrite subject" and reply.subject:
            edits = HeaderEdits(edits.add, edits.remove, reply.subject)
        ctx.facts.rspamd = RspamdFacts(
            reply.action, reply.score, reply.required, reply.symbols, edits, opts.spam_headers
        )
        top = ", ".join(f"{n}({s:.2f})" for n, s in reply.symbols)
        detail = f"{reply.action}, score {reply.score:.2f}/{reply.required:.2f}"
        if reply.skipped:
            detail = "skipped by rspamd's settings"
        if top:
            detail += f"; {top}"
        if reply.symbol_count > len(reply.symbols):
            detail += f" (+{reply.symbol_count - len(reply.symbols)} more)"
        if reply.message:
            detail += f"; message: {reply.message}"
        verdict = "skipped" if reply.skipped else _verdict_word(reply.action)
        return ScanResult(symbols, verdict, detail)


def _verdict_word(action: str) -> str:
    """One word for the log: `clean` for no action, else Rspamd's action."""
    return "clean" if action == "no action" else action.replace(" ", "_")


def _show(body: bytes) -> str:
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in body[:120])
