"""The SMTP server protocol without I/O: bytes in, commands or replies out.

Nothing here reads a socket, waits or keeps a clock, so all of it is tested
without a socket, a loop or a backend (tests/unit/smtp/test_protocol.py), and the
session (`session.py`) keeps only what needs them: waiting for bytes, the
checks, the backend.

- `Receiver`: the client's bytes framed, as h11 frames HTTP: `receive_data`
  adds bytes, `next_command` gives the next command (or the reply refusing its
  line), `next_message` the DATA content; None means more bytes are needed.
- `parse_line`: one command line to a `Command`, or the reply that refuses it
  (control characters; an unknown verb is still a command).
- `Phase` and `out_of_sequence`: the session's state table, in one place: which
  commands each phase takes and what the others are told (RFC 5321 4.1.4).
- `path_and_params`, `mail_parameters`, `rcpt_parameters`: the MAIL and RCPT
  arguments, checked and turned into what the backend is sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from gateway import dsn, replies
from gateway.address import Address, AddressError, DomainSpellingError, parse_path, split_path
from gateway.replies import Reply
from gateway.wire import number

# C0 controls but TAB, and DEL: a backend or a log reader may take any of them for
# the end of a line or a field.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

VERBS = frozenset(
    {
        b"EHLO",
        b"HELO",
        b"MAIL",
        b"RCPT",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"QUIT",
        b"VRFY",
        b"EXPN",
        b"HELP",
        b"AUTH",
        b"BDAT",
        b"XCLIENT",
        b"XFORWARD",
        b"STARTTLS",
    }
)
# RFC 2920 3.1: commands after which the client must wait for the reply.
LAST_IN_GROUP = frozenset({b"EHLO", b"HELO", b"DATA", b"NOOP", b"VRFY", b"EXPN", b"TURN"})


class Command(NamedTuple):
    verb: bytes  # upper case (not always one of VERBS: the session answers those)
    arg: str  # the rest of the line, spaces around it removed (UTF-8, surrogateescape)


def verb_of(line: bytes) -> bytes:
    """The command word of a line, upper case (at most the first four bytes when a
    space follows them, as every verb but XCLIENT/XFORWARD/STARTTLS has four)."""
    verb = line[:4].upper()
    if len(line) > 4 and line[4:5] != b" ":
        verb = line.split(b" ", 1)[0].upper()
    return verb


def parse_line(line: bytes) -> Command | Reply:
    """A command line (without its CRLF) as a command, or the reply refusing it (a
    control character). An unknown verb is still a command: the session judges the
    client's timing (RFC 2920) before it answers that it does not know it."""
    if _CTL.search(line):
        return replies.CONTROL_CHARS
    verb = verb_of(line)
    return Command(verb, line[len(verb) + 1 :].decode("utf-8", "surrogateescape").strip(" "))


# The end of DATA (RFC 5321 4.1.1.4), and the only one honoured: `\n.\n` and its
# like stay inside the content, where the bare CR/LF rule finds them (smuggling).
EOD = b"\r\n.\r\n"


class Receiver:
    """The client's side of a session, framed: bytes in, commands and messages out.

    The buffer is shared with the transport adapter (gateway/stream.py), which
    appends what arrives and pauses reading past its high-water mark; tests and
    other drivers feed `receive_data`. Only CRLF ends a line: a bare LF stays in
    it, for `parse_line` to refuse, never a command boundary. A line longer than
    `line_limit` is discarded as it arrives (never held whole) and answered once
    its CRLF is seen, so the session stays in step with the client.
    """

    __slots__ = ("_discarding", "_dropped", "_max_size", "_room", "_skipping", "_start", "buf")

    def __init__(self, buf: bytearray | None = None) -> None:
        self.buf = bytearray() if buf is None else buf
        self._skipping = False  # inside a command line already found too long
        # DATA in progress (start_message): the limits, where the marker search
        # resumes, and the content discarded so far.
        self._max_size = 0
        self._room: Callable[[int], bool] | None = None
        self._start = 0
        self._dropped = 0
        self._discarding = False

    def receive_data(self, data: bytes) -> None:
        self.buf += data

    def next_command(self, line_limit: int) -> Command | Reply | None:
        """The next command, the reply refusing its line, or None until more bytes come."""
        buf = self.buf
        i = buf.find(b"\r\n")
        if i < 0:
            if len(buf) > line_limit + 1:
                # Too long already: drop it as it comes (a CR may start the CRLF).
                cr = buf.endswith(b"\r")
                buf.clear()
                if cr:
                    buf += b"\r"
                self._skipping = True
            return None
        if i > line_limit or self._skipping:
            del buf[: i + 2]
            self._skipping = False
            return replies.LINE_TOO_LONG
        line = bytes(memoryview(buf)[:i])
        del buf[: i + 2]
        return parse_line(line)

    def start_message(self, max_size: int, room: Callable[[int], bool] | None = None) -> None:
        """Frame DATA content next (after our 354): at most `max_size` bytes kept.

        `room`, asked with the number of bytes buffered before each wait for more,
        may refuse to hold them (a memory budget); past either bound the content is
        discarded as it arrives, and only its length is given, once the end of data
        is seen."""
        self._max_size = max_size
        self._room = room
        self._start = self._dropped = 0
        self._discarding = False

    def next_message(self) -> bytes | int | None:
        """The content in wire form (dot-stuffed, with the CRLF that ends its last
        line, without the final dot); its length if it was discarded; None until the
        end of data has arrived."""
        buf = self.buf
        if not self._start and not self._dropped:  # at the content's first byte
            if buf.startswith(b".\r\n"):
                del buf[:3]
                return b""  # the empty message: its end marker has no CRLF before it
            if len(buf) < 3 and b".\r\n".startswith(buf):
                return None  # may yet be
        i = buf.find(EOD, self._start)
        if i >= 0:
            if self._discarding or i > self._max_size:
                del buf[: i + 5]
                return self._dropped + i
            data = bytes(memoryview(buf)[: i + 2])
            del buf[: i + 5]
            return data
        room = self._room
        if (
            self._discarding
            or len(buf) > self._max_size
            or (room is not None and not room(len(buf)))  # asked only while keeping
        ):
            self._discarding = True
            drop = len(buf) - 4  # what cannot be part of a marker still to come
            if drop > 0:
                del buf[:drop]
                self._dropped += drop
            self._start = 0
        else:
            self._start = max(0, len(buf) - 4)
        return None


class Phase(IntEnum):
    """Where a session is, in order: each phase is reached only through the one
    before it (RSET and a new HELO go back to GREETED)."""

    CONNECTED = 0  # greeted by us; no HELO/EHLO yet
    GREETED = 1  # HELO/EHLO accepted; no transaction
    MAIL = 2  # MAIL accepted; no recipient yet
    RCPT = 3  # at least one recipient accepted: DATA may follow


def phase_of(helo: str | None, mail_from: Address | None, recipients: int) -> Phase:
    if helo is None:
        return Phase.CONNECTED
    if mail_from is None:
        return Phase.GREETED
    return Phase.RCPT if recipients else Phase.MAIL


# The state table: the reply for a command its phase does not take. A command not
# listed is taken in every phase (HELO, RSET, NOOP, QUIT, ... and those refused in
# every phase: their handlers say why).
_SEQUENCE: dict[bytes, dict[Phase, Reply]] = {
    b"MAIL": {
        Phase.CONNECTED: replies.NEED_HELO,
        Phase.MAIL: replies.NESTED_MAIL,
        Phase.RCPT: replies.NESTED_MAIL,
    },
    b"RCPT": {Phase.CONNECTED: replies.NEED_MAIL, Phase.GREETED: replies.NEED_MAIL},
    b"DATA": {
        Phase.CONNECTED: replies.NEED_MAIL,
        Phase.GREETED: replies.NEED_MAIL,
        Phase.MAIL: replies.NEED_RCPT,
    },
}


def out_of_sequence(phase: Phase, verb: bytes) -> Reply | None:
    """The reply for `verb` in `phase` if the phase does not take it, else None."""
    table = _SEQUENCE.get(verb)
    return None if table is None else table.get(phase)


Params = dict[str, str | None]


def path_and_params(text: str, *, sender: bool, utf8_mail: bool) -> tuple[Address, Params] | Reply:
    """`<path> [KEY[=value] ...]` of MAIL FROM: or RCPT TO: (after the colon).

    Keys are upper-cased and must be unique; a non-ASCII path needs SMTPUTF8 on
    this MAIL (RFC 6531), which `utf8_mail` says for a recipient."""
    bad = replies.BAD_SENDER_ADDRESS if sender else replies.BAD_ADDRESS
    try:
        path, rest = split_path(text)
        if not sender and path.lower() == "<postmaster>":
            addr = Address("postmaster", "")
        else:
            addr = parse_path(path, allow_null=sender)
    except DomainSpellingError:
        return replies.BAD_DOMAIN_SPELLING
    except AddressError:
        return bad
    params: Params = {}
    if rest and not rest.startswith(" "):
        return bad
    for word in rest.split():
        key, eq, val = word.partition("=")
        key = key.upper()
        if not key or key in params:
            return replies.PARAM_DUPLICATE if key else replies.SYNTAX_ARGS
        params[key] = val if eq else None
    if addr.utf8 and "SMTPUTF8" not in params and (sender or not utf8_mail):
        return replies.SMTPUTF8_REQUIRED
    return addr, params


@dataclass(frozen=True, slots=True)
class MailParams:
    declared: int  # SIZE=, 0 if none
    forward: list[str]  # what the backend's MAIL carries, each checked and normalised
    utf8: bool  # SMTPUTF8


def mail_parameters(
    params: Params, *, max_size: int, tls: bool, requiretls: bool
) -> MailParams | Reply:
    """MAIL's parameters (RFC 1870 SIZE, 6152 BODY, 8689 REQUIRETLS, 6531 SMTPUTF8,
    3461 RET/ENVID): what goes to the backend, or the reply for the first bad one."""
    fwd: list[str] = []
    declared = 0
    for key, val in params.items():
        if key == "SIZE":
            size = number(val or "")  # RFC 1870: 1*20DIGIT
            if size is None:
                return replies.SYNTAX_ARGS
            declared = size
            if declared > max_size:
                return replies.SIZE_EXCEEDED
            fwd.append(f"SIZE={val}")
        elif key == "BODY":
            if val is None or val.upper() not in ("7BIT", "8BITMIME"):
                return replies.SYNTAX_ARGS
            fwd.append(f"BODY={val.upper()}")
        elif key == "REQUIRETLS":
            if val is not None:
                return replies.SYNTAX_ARGS
            if not tls:
                return replies.REQUIRETLS_NEEDS_TLS
            if not requiretls:
                return replies.REQUIRETLS_UNSUPPORTED
            fwd.append("REQUIRETLS")
        elif key == "SMTPUTF8":
            if val is not None:
                return replies.SYNTAX_ARGS
            fwd.append("SMTPUTF8")
        elif key in dsn.MAIL_KEYS:
            param = dsn.mail_param(key, val)
            if param is None:
                return replies.DSN_SYNTAX
            fwd.append(param)
        else:
            return replies.PARAM_UNKNOWN
    return MailParams(declared, fwd, "SMTPUTF8" in params)


def rcpt_parameters(params: Params, *, utf8: bool) -> list[str] | Reply:
    """RCPT's parameters (RFC 3461 NOTIFY and ORCPT only), as the backend gets them."""
    out: list[str] = []
    for key, val in params.items():
        if key not in dsn.RCPT_KEYS:
            return replies.PARAM_UNKNOWN
        param = dsn.rcpt_param(key, val, utf8)
        if param is None:
            return replies.DSN_SYNTAX
        out.append(param)
    return out


class SessionEnd(Exception):
    """Close the connection after what was already sent (QUIT, a timeout, a refusal
    that ends the session)."""
