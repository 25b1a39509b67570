"""Rspamd's HTTP protocol (`POST /checkv2` on its normal worker), without I/O.

Three pure pieces, each bounded, so the check (checks/rspamd.py) only moves bytes:

- `build_request`: the request head. The envelope and connection facts go in
  Rspamd's own request headers (IP, Helo, From, one Rcpt per recipient, Queue-Id,
  User, TLS-Version/TLS-Cipher); the message follows as the body. HTTP/1.1, so a
  server (or a balancer in front of it) that keeps connections may keep ours.
  No `Pass: all`: the action is what we need, and without it Rspamd may stop
  evaluating once a message is past its reject score (its own check_all_filters
  option says otherwise for every client). No `Hostname`: we do not resolve the
  client's name, and a wrong one would be worse than none.
- `ResponseParser`: the HTTP response, fed bytes as they come: status, a
  bounded head, a body by Content-Length, chunked or up to the close, at most
  `max_body` bytes; whether the connection may be used again.
- `parse_reply`: the JSON body as a typed `RspamdReply`: the action, the score
  and required score, the strongest symbols (at most MAX_SYMBOLS kept), the
  header changes of its `milter` block and the rewritten subject. Everything
  in it is Rspamd's (and, through symbol options or a subject, the sender's)
  text: header names must be field names, values are refolded so that no CR or
  LF can start a field or end the header section, controls and non-ASCII are
  replaced, and every count and length is bounded.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PATH = "/checkv2"

# The actions Rspamd's protocol defines (its docs: protocol.html), as it spells them.
ACTIONS = frozenset(
    {"no action", "greylist", "add header", "rewrite subject", "soft reject", "reject"}
)

# Bounds on what we read and keep.
MAX_HEAD = 16 * 1024  # status line and response header fields
MAX_HEAD_FIELDS = 64
# A reply lists every URL host and e-mail address Rspamd found in the message
# (it has no switch to leave them out), up to its max_urls (10240 by default):
# about 5 MB at worst. Above this the reply is a protocol error (rspamd.unavailable).
MAX_REPLY = 8 * 1024 * 1024
MAX_SYMBOLS = 10  # the strongest symbols kept for the log, `check` and X-Spam-Status
MAX_SYMBOL_NAME = 64
MAX_ADD_HEADERS = 32  # fields added from the milter block (each value counts)
MAX_REMOVE_HEADERS = 32
MAX_FIELD_NAME = 76  # RFC 5322 2.1.1's 78, less ": "
MAX_VALUE = 4096  # characters of one added field's value, or the subject
MAX_LINE = 900  # characters of one line of a (refolded) value: below RFC 5322's 998
MAX_MESSAGE = 200  # Rspamd's smtp_message, kept for the log only
MAX_REQUEST_VALUE = 512  # bytes of one request header value (a HELO, an address)


class RspamdProtocolError(ValueError):
    """Rspamd answered something we do not take: the connection is discarded."""


# -- the request --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """The facts of the transaction Rspamd is told. Addresses without angle
    brackets; `mail_from` "" is the null sender."""

    client_ip: str
    helo: str | None
    mail_from: str
    recipients: tuple[str, ...]
    queue_id: str
    user: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None


_REQUEST_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def request_value(value: str) -> bytes:
    """A request header value: controls (CR, LF, NUL among them) out, UTF-8, at most
    MAX_REQUEST_VALUE bytes (cut at a character boundary)."""
    raw = _REQUEST_UNSAFE.sub("", value).encode("utf-8", "replace")
    if len(raw) > MAX_REQUEST_VALUE:
        raw = raw[:MAX_REQUEST_VALUE].decode("utf-8", "ignore").encode()
    return raw


def build_request(host: str, env: Envelope, length: int) -> bytes:
    """The request head for a message of `length` bytes (the body follows it)."""
    fields: list[tuple[bytes, bytes]] = [
        (b"Host", request_value(host)),
        (b"Content-Length", str(length).encode()),
        (b"IP", request_value(env.client_ip)),
    ]
    if env.helo:
        fields.append((b"Helo", request_value(env.helo)))
    fields.append((b"From", b"<" + request_value(env.mail_from) + b">"))
    fields.extend((b"Rcpt", b"<" + request_value(r) + b">") for r in env.recipients)
    fields.append((b"Queue-Id", request_value(env.queue_id)))
    if env.user:
        fields.append((b"User", request_value(env.user)))
    if env.tls_version:
        fields.append((b"TLS-Version", request_value(env.tls_version)))
    if env.tls_cipher:
        fields.append((b"TLS-Cipher", request_value(env.tls_cipher)))
    head = [f"POST {PATH} HTTP/1.1".encode()]
    head.extend(name + b": " + value for name, value in fields)
    return b"\r\n".join(head) + b"\r\n\r\n"


# -- the HTTP response ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    reason: str
    body: bytes
    # Whether the server lets the connection serve another request.
    keep_alive: bool


_STATUS = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: ([^\r\n]*))?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:[ \t]*;[^\r\n]*)?")


class ResponseParser:
    """One HTTP/1.x response, fed as it arrives (sans I/O: `feed` takes bytes and
    returns the response once complete, `eof` says the peer closed).

    Bounded: the head at MAX_HEAD bytes and MAX_HEAD_FIELDS fields, the body at
    `max_body` bytes however it is framed. Interim 1xx responses are skipped.
    """

    def __init__(self, max_body: int = MAX_REPLY) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._scan = 0  # where to look for the end of the head next
        self._state = "head"
        self._status = 0
        self._reason = ""
        self._keep_alive = False
        self._length: int | None = None  # Content-Length, or the current chunk's size
        self._body = bytearray()

    def feed(self, data: bytes) -> HttpResponse | None:
        self._buf += data
        while True:
            if self._state == "head":
                if not self._head():
                    return None
            elif self._state == "length":
                assert self._length is not None
                need = self._length - len(self._body)
                self._body += self._buf[:need]
                del self._buf[:need]
                if len(self._body) < self._length:
                    return None
                return self._done()
            elif self._state == "chunk-size":
                if not self._chunk_size():
                    return None
            elif self._state == "chunk-data":
                if not self._chunk_data():
                    return None
            elif self._state == "trailers":
                if not self._trailers():
                    return None
                return self._done()
            elif self._state == "close":
                self._body += self._buf
                self._buf.clear()
                self._check_size(len(self._body))
                return None
            else:  # done: bytes after the response are a protocol error
                if self._buf:
                    raise RspamdProtocolError("data after the response")
                return None

    def eof(self) -> HttpResponse:
        """The peer closed the connection: the response if it ends there (a body
        delimited by the close), else an error."""
        if self._state == "close":
            self._keep_alive = False
            return self._done()
        raise RspamdProtocolError("connection closed before the response ended")

    # -- states ------------------------------------------------------------------
    def _head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n", max(0, self._scan - 3))
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise RspamdProtocolError(f"response head over {MAX_HEAD} bytes")
            self._scan = len(self._buf)
            return False
        if end > MAX_HEAD:
            raise RspamdProtocolError(f"response head over {MAX_HEAD} bytes")
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        self._scan = 0
        lines = head.split(b"\r\n")
        m = _STATUS.fullmatch(lines[0])
        if m is None:
            raise RspamdProtocolError(f"not an HTTP status line: {_show(lines[0])}")
        minor, status = m.group(1), int(m.group(2))
        if 100 <= status < 200:
            return True  # interim (100 Continue): the real response follows
        if len(lines) - 1 > MAX_HEAD_FIELDS:
            raise RspamdProtocolError(f"over {MAX_HEAD_FIELDS} response header fields")
        self._status = status
        self._reason = (m.group(3) or b"").decode("ascii", "replace")[:80]
        length: int | None = None
        chunked = False
        connection: set[str] = set()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise RspamdProtocolError(f"malformed response header: {_show(line)}")
            key = name.decode("ascii", "replace").lower()
            val = value.strip().decode("ascii", "replace")
            if key == "content-length":
                if not val.isdigit() or (length is not None and int(val) != length):
                    raise RspamdProtocolError(f"bad Content-Length: {val[:20]!r}")
                length = int(val)
            elif key == "transfer-encoding":
                codings = [c.strip().lower() for c in val.split(",") if c.strip()]
                if codings != ["chunked"]:
                    raise RspamdProtocolError(f"unsupported Transfer-Encoding: {val[:40]!r}")
                chunked = True
            elif key == "connection":
                connection |= {t.strip().lower() for t in val.split(",")}
        if minor == b"1":
            self._keep_alive = "close" not in connection
        else:
            self._keep_alive = "keep-alive" in connection
        if chunked:
            self._state = "chunk-size"  # RFC 9112 6.3: chunked wins over a length
        elif length is not None:
            self._check_size(length)
            self._length = length
            self._state = "length"
        elif status in (204, 304):
            self._length = 0
            self._state = "length"
        else:
            self._keep_alive = False
            self._state = "close"
        return True

    def _chunk_size(self) -> bool:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > 1024:
                raise RspamdProtocolError("chunk size line too long")
            return False
        m = _CHUNK_SIZE.fullmatch(bytes(self._buf[:end]))
        if m is None:
            raise RspamdProtocolError(f"bad chunk size: {_show(bytes(self._buf[:end]))}")
        del self._buf[: end + 2]
        size = int(m.group(1), 16)
        if size == 0:
            self._state = "trailers"
            return True
        self._check_size(len(self._body) + size)
        self._length = size
        self._state = "chunk-data"
        return True

    def _chunk_data(self) -> bool:
        assert self._length is not None
        if len(self._buf) < self._length + 2:
            return False
        if self._buf[self._length : self._length + 2] != b"\r\n":
            raise RspamdProtocolError("chunk not followed by CRLF")
        self._body += self._buf[: self._length]
        del self._buf[: self._length + 2]
        self._state = "chunk-size"
        return True

    def _trailers(self) -> bool:
        # Trailer fields (none expected) end with an empty line; bounded like the head.
        while True:
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    raise RspamdProtocolError("trailer section too long")
                return False
            line = bytes(self._buf[:end])
            del self._buf[: end + 2]
            if not line:
                return True

    def _check_size(self, size: int) -> None:
        if size > self.max_body:
            raise RspamdProtocolError(f"reply over {self.max_body} bytes")

    def _done(self) -> HttpResponse:
        self._state = "done"
        if self._buf:
            # A response to a request we did not send: the connection is out of step.
            raise RspamdProtocolError("data after the response")
        return HttpResponse(self._status, self._reason, bytes(self._body), self._keep_alive)


def _show(raw: bytes) -> str:
    return repr(raw[:60].decode("ascii", "replace"))


# -- the JSON reply -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RspamdReply:
    action: str  # one of ACTIONS, or another name Rspamd was configured with (sanitised)
    score: float
    required: float
    skipped: bool = False  # Rspamd's settings skipped the message
    symbols: tuple[tuple[str, float], ...] = ()  # the strongest, by |score|
    symbol_count: int = 0  # how many symbols the reply had
    subject: str | None = None  # the subject Rspamd asks for (action rewrite subject)
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[tuple[str, int], ...] = ()  # (name, which: 0 all, N, -N)
    message: str = ""  # messages.smtp_message: for the log only, never a reply
    dropped: int = 0  # header changes refused as malformed or over the bounds


def parse_reply(body: bytes, max_symbols: int = MAX_SYMBOLS) -> RspamdReply:
    """The typed reply; RspamdProtocolError for anything that is not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise RspamdProtocolError(f"reply is not JSON: {str(e)[:80]}") from None
    if not isinstance(data, dict):
        raise RspamdProtocolError("reply is not a JSON object")
    if "error" in data and "action" not in data:
        raise RspamdProtocolError(f"rspamd error: {_text(data['error'], 120)}")
    action = data.get("action")
    if not isinstance(action, str) or not action.strip():
        raise RspamdProtocolError("reply has no action")
    score = _number(data.get("score"), "score")
    required = _number(data.get("required_score", 0.0), "required_score")
    symbols, count = _symbols(data.get("symbols"), max_symbols)
    dropped = 0
    milter = data.get("milter")
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[tuple[str, int], ...] = ()
    if isinstance(milter, dict):
        add, d1 = _add_headers(milter.get("add_headers"))
        remove, d2 = _remove_headers(milter.get("remove_headers"))
        dropped += d1 + d2
    elif milter is not None:
        dropped += 1
    subject = None
    raw_subject = data.get("subject")
    if isinstance(raw_subject, str):
        subject = field_value(raw_subject)
    elif raw_subject is not None:
        dropped += 1
    messages = data.get("messages")
    message = ""
    if isinstance(messages, dict) and isinstance(messages.get("smtp_message"), str):
        message = _text(messages["smtp_message"], MAX_MESSAGE)
    return RspamdReply(
        action=_action(action),
        score=score,
        required=required,
        skipped=data.get("is_skipped") is True,
        symbols=symbols,
        symbol_count=count,
        subject=subject,
        add_headers=add,
        remove_headers=remove,
        message=message,
        dropped=dropped,
    )


_ACTION_UNSAFE = re.compile(r"[^a-z0-9 _-]")


def _action(raw: str) -> str:
    """Rspamd's spelling ("add header"); an underscore spelling read as the same."""
    a = raw.strip().lower()
    spaced = a.replace("_", " ")
    if spaced in ACTIONS:
        return spaced
    return _ACTION_UNSAFE.sub("?", a)[:32]


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RspamdProtocolError(f"{what} is not a finite number")
    return float(v)


_SYMBOL_UNSAFE = re.compile(r"[^A-Za-z0-9_.:+-]")


def _symbols(raw: Any, keep: int) -> tuple[tuple[tuple[str, float], ...], int]:
    """The `keep` symbols of greatest weight (|score|, then name), and the count."""
    if not isinstance(raw, dict):
        return (), 0

    def scored() -> Iterable[tuple[float, str, float]]:
        for name, sym in raw.items():
            score = sym.get("score") if isinstance(sym, dict) else None
            if isinstance(score, bool) or not isinstance(score, int | float):
                continue
            if not math.isfinite(score):
                continue
            clean = _SYMBOL_UNSAFE.sub("?", str(name)[:MAX_SYMBOL_NAME]) or "?"
            yield abs(score), clean, float(score)

    top = heapq.nsmallest(keep, scored(), key=lambda t: (-t[0], t[1]))
    return tuple((name, score) for _, name, score in top), len(raw)


_FIELD_NAME = re.compile(rf"[\x21-\x39\x3b-\x7e]{{1,{MAX_FIELD_NAME}}}")
# Any line break a reader might honour: CRLF, CR, LF, and the Unicode ones.
_BREAK = re.compile(r"\r\n|[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_VALUE_UNSAFE = re.compile(r"[^\t\x20-\x7e]")


def field_name(name: Any) -> str | None:
    """`name` if it is a header field name (RFC 5322 ftext, bounded), else None."""
    if isinstance(name, str) and _FIELD_NAME.fullmatch(name):
        return name
    return None


def field_value(raw: str, limit: int = MAX_VALUE) -> str:
    """A header field value built from `raw`: each of its lines trimmed, empty ones
    dropped, rejoined as folding (CRLF and a tab), so no line can begin a field of
    its own or end the header section; every other control and every non-ASCII
    character made "?" (Rspamd encodes what it means as non-ASCII, RFC 2047);
    lines at most MAX_LINE characters, the value at most `limit`."""
    out: list[str] = []
    size = 0
    for line in _BREAK.split(raw[: limit * 2]):
        line = _VALUE_UNSAFE.sub("?", line).strip(" \t")
        if not line:
            continue
        line = line[:MAX_LINE]
        if size + len(line) > limit:
            line = line[: max(0, limit - size)]
            if line:
                out.append(line)
            break
        out.append(line)
        size += len(line)
    return "\r\n\t".join(out)


def _add_headers(raw: Any) -> tuple[tuple[tuple[str, str], ...], int]:
    """milter.add_headers: {name: value | {value, order} | [either, ...]}. The order
    is not kept: added fields go with ours, in front of the message."""
    if raw is None:
        return (), 0
    if not isinstance(raw, dict):
        return (), 1
    out: list[tuple[str, str]] = []
    dropped = 0
    for name, spec in raw.items():
        items = spec if isinstance(spec, list) else [spec]
        valid = field_name(name)
        for item in items:
            value = item.get("value") if isinstance(item, dict) else item
            if valid is None or not isinstance(value, str) or len(out) >= MAX_ADD_HEADERS:
                dropped += 1
                continue
            out.append((valid, field_value(value)))
    return tuple(out), dropped


def _remove_headers(raw: Any) -> tuple[tuple[tuple[str, int], ...], int]:
    """milter.remove_headers: {name: N}: 0 every field of that name, N the Nth from
    the top (1 the first), -N the Nth from the bottom."""
    if raw is None:
        return (), 0
    if not isinstance(raw, dict):
        return (), 1
    out: list[tuple[str, int]] = []
    dropped = 0
    for name, which in raw.items():
        valid = field_name(name)
        if (
            valid is None
            or isinstance(which, bool)
            or not isinstance(which, int)
            or abs(which) > 10_000
            or len(out) >= MAX_REMOVE_HEADERS
        ):
            dropped += 1
            continue
        out.append((valid, which))
    return tuple(out), dropped


def _text(v: Any, limit: int) -> str:
    return _VALUE_UNSAFE.sub("?", str(v).replace("\r", " ").replace("\n", " "))[:limit]
