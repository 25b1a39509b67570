"""The one table of every reply the gateway words itself.

Checks emit symbols, the policy turns them into actions, and only this module
turns an action or a protocol event into wire text with an RFC 3463 enhanced
status code. Replies relayed from the backend are not ours and pass through
`from_backend` untouched, but for the code of a 421 (see there).

Each entry's key doubles as the closed-set `reason` label in metrics and logs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from gateway.vocab import Action


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str
    reason: str = ""

    def wire(self) -> bytes:
        """Render as one or more reply lines (multi-line when the text has newlines)."""
        lines = self.text.split("\n")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    @property
    def positive(self) -> bool:
        return self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


def r(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text)


# -- protocol replies (not policy decisions) ---------------------------------
GREETING = "220 {host} ESMTP ready"
OK = r(250, "2.0.0", "OK")
SENDER_OK = r(250, "2.1.0", "Sender OK")
RECIPIENT_OK = r(250, "2.1.5", "Recipient OK")
RESET_OK = r(250, "2.0.0", "Reset OK")
NOOP_OK = r(250, "2.0.0", "OK")
BYE = r(221, "2.0.0", "Bye")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
START_TLS = r(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = r(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = r(214, "2.0.0", "See RFC 5321")
DELIVERED = r(250, "2.0.0", "Message accepted for delivery")

SYNTAX_UNRECOGNIZED = r(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = r(500, "5.5.6", "Error: command line too long")
SYNTAX_ARGS = r(501, "5.5.4", "Syntax error in parameters or arguments")
SYNTAX_HELO = r(501, "5.5.4", "Syntax: EHLO hostname (or HELO hostname)")
SYNTAX_MAIL = r(501, "5.5.4", "Syntax: MAIL FROM:<address>")
SYNTAX_RCPT = r(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_ADDRESS = r(501, "5.1.3", "Bad address syntax")
BAD_SENDER_ADDRESS = r(501, "5.1.7", "Bad sender address syntax")
# A UTF-8 domain that is not exactly a valid IDNA 2008 spelling (address.py).
BAD_DOMAIN_SPELLING = r(553, "5.1.3", "Domain is not a valid IDNA 2008 name as written")
CONTROL_CHARS = r(501, "5.5.2", "Error: control characters are not allowed in commands")
NOT_IMPLEMENTED = r(502, "5.5.1", "Error: command not implemented")
AUTH_NOT_OFFERED = r(502, "5.5.1", "Error: authentication not enabled on this service")
BDAT_NOT_OFFERED = r(502, "5.5.1", "Error: CHUNKING not offered")
XCOMMAND_REFUSED = r(502, "5.5.1", "Error: command not available to this client")
NEED_HELO = r(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = r(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = r(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = r(503, "5.5.1", "Error: nested MAIL command")
# After a 554 greeting, to anything but QUIT (RFC 5321 3.1).
REFUSED_SESSION = r(503, "5.5.1", "Error: bad sequence of commands: access denied, send QUIT")
TLS_ALREADY = r(503, "5.5.1", "Error: TLS already active")
TLS_NOT_OFFERED = r(502, "5.5.1", "Error: STARTTLS not offered here")
NO_VALID_RECIPIENTS = r(554, "5.5.1", "Error: no valid recipients")
PARAM_UNKNOWN = r(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
PARAM_DUPLICATE = r(501, "5.5.4", "Duplicate MAIL/RCPT parameter")
DSN_SYNTAX = r(501, "5.5.4", "Malformed DSN parameter (RET, ENVID, NOTIFY or ORCPT: RFC 3461)")
SMTPUTF8_REQUIRED = r(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
# The backend lacks SMTPUTF8 / 8BITMIME and the message needs it (RFC 6531, RFC 6152).
SMTPUTF8_UNSUPPORTED = r(553, "5.6.7", "Non-ASCII address not accepted by the destination")
UTF8_HEADERS_UNSUPPORTED = r(
    554, "5.6.9", "UTF-8 header fields cannot be passed on: the destination lacks SMTPUTF8"
)
EIGHT_BIT_UNSUPPORTED = r(
    554, "5.6.3", "8-bit content cannot be passed on: the destination lacks 8BITMIME"
)
TLS_REQUIRED = r(530, "5.7.0", "Must issue a STARTTLS command first")
REQUIRETLS_NEEDS_TLS = r(530, "5.7.10", "REQUIRETLS needs a TLS session: issue STARTTLS first")
REQUIRETLS_UNSUPPORTED = r(550, "5.7.30", "REQUIRETLS support required but not available here")

SIZE_EXCEEDED = r(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = r(552, "5.3.4", "Message header size exceeds fixed maximum size")
HEADER_TOO_MANY_FIELDS = r(552, "5.3.4", "Message header has too many fields")
HEADER_TOO_MANY_LINES = r(552, "5.3.4", "Message header has too many lines")
TOO_MANY_RECIPIENTS = r(452, "4.5.3", "Error: too many recipients")
# The process's budget for message data is spent (smtp/memory.py): at MAIL, or at
# the end of a DATA transfer that did not fit (RFC 1870 6.1; RFC 3463 4.3.1).
NO_MEMORY = r(452, "4.3.1", "Insufficient system storage, try again later")
BARE_LF = r(550, "5.5.2", "Message contains bare CR or LF line endings (RFC 5321 2.3.8)")
NUL_IN_DATA = r(550, "5.6.0", "Message contains NUL characters")
MAIL_LOOP = r(554, "5.4.6", "Too many hops (Received header fields): mail loop?")
# Its first line would continue the last header field the gateway adds in front of it.
HEADER_STARTS_FOLDED = r(550, "5.6.0", "Message header begins with a continuation line")
PREGREET = r(554, "5.5.0", "SMTP synchronization error: input before the greeting")
SYNC_ERROR = r(554, "5.5.0", "SMTP synchronization error: input before our reply")
TOO_MANY_ERRORS = r(421, "4.7.0", "Error: too many errors, closing connection")
TIMEOUT = r(421, "4.4.2", "Error: timeout exceeded, closing connection")
TOO_MANY_CONNECTIONS = r(421, "4.7.0", "Error: too many connections, try again later")
SHUTTING_DOWN = r(421, "4.3.2", "Service shutting down, closing connection")

BACKEND_UNAVAILABLE = r(451, "4.4.1", "Next hop unavailable, try again later")
# Up, but no session for us: its connection limit, or backend.max_sessions.
BACKEND_BUSY = r(451, "4.4.5", "Next hop busy, try again later")
# This client holds backend.max_sessions_per_client backend sessions (its own share).
BACKEND_CLIENT_CAP = r(451, "4.4.5", "Too many sessions to the next hop from this client")
BACKEND_LOST = r(451, "4.4.2", "Connection to next hop lost, try again later")
BACKEND_TIMEOUT = r(451, "4.4.2", "Next hop timed out, try again later")
BACKEND_BAD_REPLY = r(451, "4.4.0", "Next hop returned an invalid reply, try again later")
# The next hop refused this client's details (XCLIENT/XFORWARD, its HELO name): only
# this client is affected; the session is discarded.
BACKEND_REFUSED_CLIENT = r(451, "4.7.0", "Next hop refused this session's details, try again later")
BACKEND_PARTIAL = r(451, "4.3.0", "Delivery incomplete at next hop, try again later")
# An LMTP next hop delivered to some recipients and refused the others for good; one
# line per refused recipient follows (partial_refusal).
BACKEND_PARTIAL_REFUSED = r(
    554, "5.3.0", "Delivered to {delivered} of {total} recipients; the next hop refused:"
)
# The backend transaction had to be opened again (SRS sender, quarantine redirect) and
# the next hop refused it: everything already accepted must be retried.
BACKEND_REOPEN_FAILED = r(
    451, "4.3.0", "Next hop refused the reopened transaction, try again later"
)
LOCAL_ERROR = r(451, "4.3.0", "Local error in processing, try again later")

# Address rewriting (gateway/rewrite).
ALIAS_LOOP = r(550, "5.4.6", "Recipient alias expansion failed (loop, too deep or too wide)")
SRS_INVALID = r(550, "5.1.1", "Invalid or expired SRS bounce address")
# Past a few invalid SRS addresses from one client (smtp/guard.py): no more checked.
SRS_LIMITED = r(450, "4.7.1", "Too many invalid SRS bounce addresses from this client")
ALIAS_ACCEPTED = r(250, "2.1.5", "Recipient ok")


# -- policy replies: the wording of an action, by the symbol that caused it ----
# A symbol missing here gets the action's generic reply below.
SYMBOL_REPLIES: dict[str, dict[Action, Reply]] = {
    "relay.denied": {
        Action.REJECT: r(550, "5.7.1", "Relay access denied"),
        Action.TEMPFAIL: r(450, "4.7.1", "Relay access denied"),
    },
}

SYMBOL_REPLIES.update(
    {
        # RFC 7372: 5.7.23 SPF validation failed, x.7.24 SPF validation error.
        "spf.fail": {
            Action.REJECT: r(550, "5.7.23", "SPF validation failed"),
            Action.TEMPFAIL: r(451, "4.7.23", "SPF validation failed"),
        },
        "spf.softfail": {Action.REJECT: r(550, "5.7.23", "SPF validation failed (softfail)")},
        "spf.permerror": {Action.REJECT: r(550, "5.7.24", "SPF validation error")},
        "spf.temperror": {Action.TEMPFAIL: r(451, "4.7.24", "SPF validation error, try again")},
        "spf.timeout": {Action.TEMPFAIL: r(451, "4.7.24", "SPF validation error, try again")},
        "spf.error": {Action.TEMPFAIL: r(451, "4.7.24", "SPF validation error, try again")},
        # RFC 7372: 5.7.20 no passing DKIM signature, 5.7.21 no acceptable one,
        # 5.7.22 no valid author-matched one.
        "dkim.fail": {Action.REJECT: r(550, "5.7.20", "No passing DKIM signature found")},
        "dkim.permerror": {Action.REJECT: r(550, "5.7.21", "No acceptable DKIM signature")},
        "dkim.temperror": {Action.TEMPFAIL: r(451, "4.7.20", "DKIM key lookup failed, try again")},
        "dmarc.reject": {
            Action.REJECT: r(550, "5.7.1", "Rejected by the DMARC policy of the sender's domain"),
        },
        "dmarc.quarantine": {
            Action.REJECT: r(550, "5.7.1", "Rejected by the DMARC policy of the sender's domain"),
        },
        "dmarc.fail": {
            Action.REJECT: r(550, "5.7.1", "DMARC validation failed"),
        },
        "dmarc.temperror": {
            Action.TEMPFAIL: r(451, "4.7.1", "DMARC policy lookup failed, try again"),
        },
        "dmarc.malformed": {
            Action.REJECT: r(550, "5.6.0", "Message must have exactly one From address"),
        },
    }
)

SYMBOL_REPLIES.update(
    {
        # {detail}: the zone (or its configured reply_text) and its TXT reason.
        "dnsbl.listed": {
            Action.REJECT: r(554, "5.7.1", "Service unavailable; client blocked using {detail}"),
            Action.TEMPFAIL: r(450, "4.7.1", "Service unavailable; client listed at {detail}"),
        },
        "dnsbl.temperror": {Action.TEMPFAIL: r(451, "4.7.1", "DNSBL lookup failed, try again")},
        # At connect these become 421 (the session's rule for greetings).
        "ratelimit.exceeded": {
            Action.TEMPFAIL: r(450, "4.7.1", "Rate limit exceeded, try again later"),
            Action.REJECT: r(550, "5.7.1", "Rate limit exceeded"),
        },
        "ratelimit.concurrency": {
            Action.TEMPFAIL: r(421, "4.7.0", "Too many connections from your address"),
        },
        # {detail}: the sender domain, the recipient domain or "your network".
        "tls.required": {
            Action.REJECT: r(
                530, "5.7.10", "Must issue a STARTTLS command first: TLS required for {detail}"
            ),
            Action.TEMPFAIL: r(450, "4.7.0", "TLS required for {detail}; try again with STARTTLS"),
        },
        # The shared store (Redis) did not answer and the policy fails closed.
        "ratelimit.unavailable": {
            Action.TEMPFAIL: r(451, "4.3.0", "Rate limit service unavailable, try again later"),
        },
    }
)

SYMBOL_REPLIES.update(
    {
        # Content scanners. A virus reply names no signature: the sender learns only
        # that its message carries one (the name is in our log line).
        "virus.found": {Action.REJECT: r(554, "5.7.0", "Message rejected: virus found")},
        # clamd refused or dropped the connection, or said it could not scan, and
        # the policy fails closed.
        "clamav.unavailable": {
            Action.TEMPFAIL: r(451, "4.3.0", "Virus scanner unavailable, try again later"),
        },
        # clamd gave no verdict within checks.clamav.timeout.
        "clamav.timeout": {
            Action.TEMPFAIL: r(451, "4.3.0", "Virus scan timed out, try again later"),
        },
        # Over checks.clamav.max_size (or clamd's StreamMaxLength): not scanned.
        "clamav.too_big": {
            Action.REJECT: r(552, "5.3.4", "Message too big to be scanned for viruses"),
        },
    }
)

SYMBOL_REPLIES.update(
    {
        # Rspamd's verdict (checks.rspamd). The symbols and score are in our log
        # line; the sender learns only that the message was taken for spam.
        "rspamd.reject": {
            Action.REJECT: r(554, "5.7.1", "Message rejected as spam"),
            Action.TEMPFAIL: r(451, "4.7.1", "Message deferred as probable spam, try again later"),
        },
        # Rspamd asks for a retry (its ratelimit or greylist module, a timeout of its own).
        "rspamd.soft_reject": {
            Action.TEMPFAIL: r(451, "4.7.1", "Deferred by the spam filter, try again later"),
        },
        "rspamd.greylist": {
            Action.TEMPFAIL: r(451, "4.7.1", "Greylisted, try again later"),
        },
        # Rspamd refused, dropped or garbled the conversation, or gave no verdict
        # within checks.rspamd.timeout, and the policy fails closed.
        "rspamd.unavailable": {
            Action.TEMPFAIL: r(451, "4.3.0", "Spam filter unavailable, try again later"),
        },
        "rspamd.timeout": {
            Action.TEMPFAIL: r(451, "4.3.0", "Spam filter timed out, try again later"),
        },
        # Over checks.rspamd.max_size: not scanned.
        "rspamd.too_big": {
            Action.REJECT: r(552, "5.3.4", "Message too big to be scanned for spam"),
        },
    }
)

SYMBOL_REPLIES.update(
    {
        # Greylisting (checks.greylist): the first attempt of an unknown triplet, or
        # a retry before checks.greylist.delay. {detail}: the seconds left until a
        # retry passes ("300 seconds"), so a client that schedules by the reply
        # (and the human reading a bounce's transcript) knows when.
        "greylist.deferred": {
            Action.TEMPFAIL: r(451, "4.7.1", "Greylisted, please try again in {detail}"),
        },
        # The greylist's Redis store did not answer and the policy fails closed.
        "greylist.unavailable": {
            Action.TEMPFAIL: r(451, "4.3.0", "Greylisting service unavailable, try again later"),
        },
    }
)

ACTION_REPLIES: dict[Action, Reply] = {
    Action.REJECT: r(550, "5.7.1", "Message rejected by policy"),
    Action.TEMPFAIL: r(451, "4.7.1", "Temporarily deferred by policy, try again later"),
}


# RFC 5321 4.2: reply text is HT and printable ASCII, a line at most 512 octets with
# its code and CRLF (4.5.3.1.5).
_NOT_TEXT = re.compile(r"[^\t\x20-\x7e]")
_MAX_REPLY_TEXT = 512 - len("250-") - len("\r\n")


def _reply_text(text: str, limit: int = _MAX_REPLY_TEXT) -> str:
    return _NOT_TEXT.sub("?", text)[:limit]


def for_action(action: Action, symbol: str, detail: str | None = None) -> Reply:
    """The reply for a refusing action, worded by the symbol that decided it.

    `detail` fills a `{detail}` slot (a DNSBL zone and its reason); it is made reply
    text (_reply_text) so nothing a DNS zone says can break the reply line.
    """
    base = SYMBOL_REPLIES.get(symbol, {}).get(action) or ACTION_REPLIES[action]
    text = base.text
    if "{detail}" in text:
        text = text.replace("{detail}", _reply_text(detail or "a block list", 200))
    return Reply(base.code, base.enhanced, text, symbol)


_LISTED_REFUSALS = 5


def partial_refusal(delivered: int, refused: list[tuple[str, str]]) -> Reply:
    """BACKEND_PARTIAL_REFUSED with a line per refused (recipient, backend reply).

    The client bounces the message to its sender with this text, so the sender
    learns who did not get it; the first five are named, each line printable
    ASCII and short enough for a reply line (RFC 5321 4.5.3.1.5).
    """
    base = BACKEND_PARTIAL_REFUSED
    lines = [base.text.format(delivered=delivered, total=delivered + len(refused))]
    for rcpt, why in refused[:_LISTED_REFUSALS]:
        lines.append(_reply_text(f"<{rcpt}> {why}", 400))
    if len(refused) > _LISTED_REFUSALS:
        lines.append(f"and {len(refused) - _LISTED_REFUSALS} more")
    return Reply(base.code, base.enhanced, "\n".join(lines), base.reason)


def from_backend(code: int, lines: list[str]) -> Reply:
    """A backend reply relayed verbatim (its own enhanced code stays in the text),
    but for a 421. That code says the server is closing the channel (RFC 5321
    3.8), and a client takes it so; but it is the backend closing its session,
    not we ours, which stays open for the client's next transaction. So a 421
    goes on as a 451 with the backend's text: the same retry, no false close."""
    if code == 421:
        code = 451
    # And its text as reply text may be: what the backend writes is not always fit
    # for a client's terminal or parser (a NUL, an escape sequence, a runaway line).
    text = [_reply_text(line) for line in lines]
    return Reply(code, "", "\n".join(text), "backend")


@functools.lru_cache(maxsize=1024)
def backend_wire(code: int, lines: tuple[str, ...]) -> bytes:
    """from_backend(code, lines).wire(), cached: a backend repeats a few replies."""
    return from_backend(code, list(lines)).wire()


def _name_reasons() -> None:
    """Give every module-level reply its own name as its closed-set reason label."""
    g = globals()
    for name, val in list(g.items()):
        if isinstance(val, Reply) and not val.reason:
            g[name] = Reply(val.code, val.enhanced, val.text, name.lower())


_name_reasons()
