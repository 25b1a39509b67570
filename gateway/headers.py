"""Headers the gateway adds: Received (RFC 5321 4.4) and policy tags."""

from __future__ import annotations

import contextlib
import functools
import re
import time
import unicodedata
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import idna

from gateway.facts import HeaderEdits, RspamdFacts
from gateway.vocab import AuthResult
from gateway.wire import stuff, wire_header

# Besides what is not printable ASCII, the characters that would end the
# from-domain token of a Received field or open a comment, a quoted string, a
# path or an address there (Postfix neuters the same set in the HELO name).
_UNSAFE = re.compile(r'[^\x21-\x7e]|[<>()\\";@]')


def _clean(s: str, limit: int = 255) -> str:
    """Client-chosen text (HELO) as one token a Received parser reads as the
    from-domain: `EHLO a)(by`, say, must not unbalance the field's comments."""
    return _UNSAFE.sub("?", s[:limit]) or "unknown"


class DateCache:
    """formatdate() once per second instead of once per message."""

    def __init__(self) -> None:
        self._sec = -1
        self._text = ""

    def now(self) -> str:
        sec = int(time.time())
        if sec != self._sec:
            self._sec = sec
            self._text = formatdate(sec, localtime=True)
        return self._text


_dates = DateCache()


def received(
    *,
    helo: str | None,
    client_ip: str,
    hostname: str,
    proto: str,
    session_id: str,
    tls: str | None,
    recipient: str | None,
) -> bytes:
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    parts = [f"Received: from {_clean(helo or 'unknown')} ([{ip}])"]
    parts.append(f"\tby {hostname} (smtp-gateway) with {proto} id {session_id}")
    if tls:
        parts.append(f"\t({tls})")
    tail = (
        f"\tfor <{recipient}>;"
        if recipient and len(recipient) < 200 and recipient.isascii()
        else "\t"
    )
    tail = (tail + " " if tail != "\t" else tail) + _dates.now()
    parts.append(tail)
    return ("\r\n".join(parts) + "\r\n").encode("ascii", "replace")


def tag(name: str, symbols: list[str]) -> bytes:
    return (_fold(f"{name}: {', '.join(symbols)}") + "\r\n").encode("ascii", "replace")


def quarantine(name: str, recipients: list[str], symbols: list[str]) -> bytes:
    """Why a message was quarantined and whom it was for (addresses are parsed
    envelope paths: they cannot carry CR or LF)."""
    rcpts = ", ".join(f"<{r}>" for r in recipients)
    text = f"{name}: symbols={','.join(symbols)}; original-recipients={rcpts}"
    return (_fold(text) + "\r\n").encode("utf-8", "replace")


_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")


def too_many_received(wire: bytes, limit: int) -> bool:
    """Whether the header section holds more than `limit` Received fields (the
    body is never read), counted as the backend will store them (a stuffed
    `.Received:` is a Received field).

    Why two steps: this runs on every message. A case-folded count of the lines
    that start with "received" (Received-SPF too) bounds the answer for the
    price of one copy of the header section; only a message past that bound
    pays for the exact count of field names.
    """
    head, _ = wire_header(wire)
    folded = head.lower()
    if folded.count(b"\nreceived") + folded.startswith(b"received") <= limit:
        return False
    return len(_RECEIVED.findall(head)) > limit


def strip_comments(value: str) -> str:
    """`value` with its RFC 5322 comments, of any depth, each replaced by a space.

    One pass, linear: a backslash quotes the next character, a quoted string
    is kept as it is (parentheses in it are not comments), and an unclosed
    comment runs to the end, as a lenient reader would take it.
    """
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if depth == 0 and ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
            if depth == 1:
                out.append(" ")
            continue
        elif not quoted and ch == ")" and depth:
            depth -= 1
            continue
        if depth == 0:
            out.append(ch)
    return "".join(out)


def _authserv_id(value: str) -> str:
    """The authserv-id of an A-R value as any reader might take it: comments of any
    depth and folding removed, a quoted-string unquoted, backslashes dropped, case and
    a trailing dot ignored; an id in encoded words is ENCODED (see below). Anything
    that could read as our name counts as our name."""
    v = strip_comments(value).split(";", 1)[0].strip()
    if not v:
        return ""
    if v.startswith('"'):
        end = v.find('"', 1)
        token = v[1:end] if end > 0 else v[1:]
        token = token.replace("\\", "")
    else:
        # Backslashes are not allowed outside a quoted string; a lenient reader drops
        # them (`gw\.example`, `gw.example\;` read as ours).
        token = v.split()[0].replace("\\", "")
    if "=?" in token:
        # Encoded words are not allowed here (RFC 8601: a token or a quoted string),
        # so no server writes them; a reader that decodes them anyway may read our
        # name out of any number of them, split or with an encoded ";". Not decoded
        # (the email package is quadratic in them, and raises on broken ones): such
        # an id counts as ours, and the field is removed.
        return ENCODED
    return _loose(token.strip())


# What `_authserv_id` returns for an id written in encoded words.
ENCODED = "=?"


def _loose(name: str) -> str:
    """A name as a lenient reader may compare it: case and a trailing dot ignored,
    and a non-ASCII one mapped as UTS 46 maps domain names (full-width letters and
    dots, the ideographic full stop, zero-width and other ignored characters), so
    `\uff47\uff57.example` (full-width) and `gw\u200b.example` read as `gw.example`."""
    if not name.isascii():
        # Format characters (zero-width joiners, soft hyphen, ...) first: UTS 46 keeps
        # the joiners, IDNA 2003 and transitional readers drop them.
        name = "".join(c for c in name if unicodedata.category(c) != "Cf")
        with contextlib.suppress(idna.IDNAError, ValueError):
            name = idna.uts46_remap(name, std3_rules=False, transitional=False)
    return name.rstrip(".").lower()


def _aar_authserv_id(value: str) -> str:
    """ARC-Authentication-Results: `i=N;` and then an A-R value (RFC 8617 4.1.1)."""
    _, semi, rest = strip_comments(value).partition(";")
    return _authserv_id(rest) if semi else ""


@dataclass(frozen=True)
class OurFields:
    """What a client may not write because a reader downstream would take it as ours:
    Authentication-Results and ARC-Authentication-Results under our authserv-id,
    Received-SPF naming us, and the fields only we add (the policy's tag and
    quarantine headers, the original-recipient header)."""

    authserv_id: str
    names: frozenset[bytes]  # lower case, always removed
    hosts: tuple[str, ...]  # lower case: a Received-SPF naming any of them is removed

    @functools.cached_property
    def candidates(self) -> re.Pattern[bytes]:
        """The field names worth a closer look, to find them with one search."""
        names = sorted({*self.names, *_JUDGED})
        return re.compile(rb"(?im)^(?:" + b"|".join(re.escape(n) for n in names) + rb")[ \t]*:")


_JUDGED = (b"authentication-results", b"arc-authentication-results", b"received-spf")


@functools.lru_cache(maxsize=16)
def our_fields(authserv_id: str, hostname: str, names: tuple[str, ...]) -> OurFields:
    """Made once per policy (its header names) and kept: a DATA only looks it up."""
    ours = _loose(authserv_id)
    return OurFields(
        ours,
        frozenset(n.lower().encode() for n in names),
        tuple(sorted({ours, hostname.rstrip(".").lower()})),
    )


def _claims_ours(name: bytes, value: bytes, ours: OurFields) -> bool:
    if name in ours.names:
        return True
    text = value.decode("utf-8", "replace")
    if name == b"authentication-results":
        return _authserv_id(text) in (ours.authserv_id, ENCODED)
    if name == b"arc-authentication-results":
        return _aar_authserv_id(text) in (ours.authserv_id, ENCODED)
    if name == b"received-spf":  # RFC 7208 9.1: no authserv-id; receiver= or a comment
        if not text.isascii():  # full-width letters, zero-width characters: as read
            text = unicodedata.normalize("NFKC", text)
            text = "".join(c for c in text if unicodedata.category(c) != "Cf")
        lowered = text.lower()
        return any(h in lowered for h in ours.hosts)
    return False


def strip_forged(wire: bytes, ours: OurFields) -> tuple[bytes, int]:
    """Remove the header fields a client wrote in our name (OurFields), in every
    spelling the backend will store: read unstuffed (a stuffed `.Authentication-
    Results:` is one), names in any case, comments of any depth.

    Only the header section is read and rewritten; the body is never touched. One
    search finds the candidate fields; only those are read (not every field of the
    section, which cost 3 µs a field). Returns the new wire form and how many
    fields were removed.
    """
    head, end = wire_header(wire)
    drop: list[tuple[int, int]] = []
    for m in ours.candidates.finditer(head):
        stop = _field_end(head, m.end())
        lines = head[m.end() : stop - 2].split(b"\r\n")
        value = b" ".join(line.strip() for line in lines)
        name = head[m.start() : m.end() - 1].rstrip(b" \t").lower()
        if _claims_ours(name, value, ours):
            drop.append((m.start(), stop))
    if not drop:
        return wire, 0  # the common case costs one search
    kept, last = [], 0
    for start, stop in drop:
        kept.append(head[last:start])
        last = stop
    kept.append(head[last:])
    # The body joined through a view: one copy of a large message, not two.
    return b"".join((stuff(b"".join(kept)), memoryview(wire)[end:])), len(drop)


@dataclass(frozen=True, slots=True)
class Verdicts:
    """What the checks and the policy made of a message, as header fields show it."""

    authserv_id: str
    auth: list[AuthResult]
    tag_header: str
    tags: list[str]
    # (field name, the recipients the message was for) when it is quarantined.
    quarantine: tuple[str, list[str]] | None = None
    # Rspamd's verdict: our X-Spam-* fields, and the header changes it asks for.
    spam: RspamdFacts | None = None


def compose(
    wire: bytes, received: bytes, ours: OurFields, verdicts: Verdicts, extra: bytes = b""
) -> tuple[bytes, bytes, int]:
    """The message as the backend gets it: `wire` without the fields a client wrote
    in our name, and ours to put in front, in order: Received (a trace field goes
    on top, RFC 5321 4.4), `extra` (X-Original-To), Authentication-Results, the
    policy's tag, the quarantine note, our X-Spam-* fields; then the fields Rspamd
    asks to add. Rspamd's removals and rewritten Subject change `wire` (never our
    fields, which are not in it). Returns (wire, our fields, fields removed).

    Only we speak for our authserv-id and write our fields, whoever the client
    is (trusted or not), and whatever Rspamd asks.
    """
    wire, forged = strip_forged(wire, ours)
    prefix = received + extra + authentication_results(verdicts.authserv_id, verdicts.auth)
    if verdicts.tags:
        prefix += tag(verdicts.tag_header, verdicts.tags)
    if verdicts.quarantine is not None:
        name, recipients = verdicts.quarantine
        prefix += quarantine(name, recipients, verdicts.tags)
    spam = verdicts.spam
    if spam is not None:
        if spam.spam_headers:
            prefix += spam_fields(spam)
        prefix += added_fields(spam.edits, ours)
        wire = edit_section(wire, spam.edits)
    return wire, prefix, forged


# Our fields from Rspamd's verdict (checks.rspamd.spam_headers); in OurFields.names
# when they are on, so a client's own are removed and Rspamd cannot add them.
SPAM_FIELDS = ("X-Spam-Status", "X-Spam-Score", "X-Spam-Action")
# Rspamd's actions for which its own X-Spam-Status says Yes (milter_headers).
_NOT_SPAM = ("no action", "greylist")


def spam_fields(v: RspamdFacts) -> bytes:
    """X-Spam-Status (Yes or No as Rspamd's own field says it, the score, the
    required score and the strongest symbols), X-Spam-Score, X-Spam-Action."""
    verdict = "No" if v.action in _NOT_SPAM else "Yes"
    status = f"X-Spam-Status: {verdict}, score={v.score:.2f} required={v.required:.2f}"
    if v.symbols:
        status += " tests=" + ",".join(f"{n}({s:.2f})" for n, s in v.symbols)
    action = _SAFE_TEXT.sub("?", v.action)[:32]
    return (
        _fold(status) + f"\r\nX-Spam-Score: {v.score:.2f}\r\nX-Spam-Action: {action}\r\n"
    ).encode("ascii", "replace")


_SAFE_TEXT = re.compile(r"[^\x20-\x7e]")
_SAFE_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
# A value as rspamd_protocol.field_value makes it: printable ASCII lines joined by
# CRLF and a tab. Checked again here, the one place that writes fields.
_SAFE_VALUE = re.compile(r"[\t\x20-\x7e]*(?:\r\n\t[\t\x20-\x7e]*)*")


def added_fields(edits: HeaderEdits, ours: OurFields) -> bytes:
    """The fields Rspamd asks to add, but any in our name (our field names, an
    Authentication-Results with our authserv-id) and any not safely formed."""
    out = []
    for name, value in edits.add:
        raw_name, raw_value = name.encode("ascii", "replace"), value.encode("ascii", "replace")
        if not _SAFE_NAME.fullmatch(name) or not _SAFE_VALUE.fullmatch(value):
            continue
        if _claims_ours(raw_name.lower(), raw_value, ours):
            continue
        out.append(raw_name + b": " + raw_value + b"\r\n")
    return b"".join(out)


def edit_section(wire: bytes, edits: HeaderEdits) -> bytes:
    """`wire` with the header fields Rspamd asks to remove removed (by name, any
    case: 0 every one, N the Nth from the top, -N the Nth from the bottom) and its
    Subject in place of the first Subject field (the others removed; added at the
    end of the section if there was none). The body is not touched."""
    if not edits.remove and edits.subject is None:
        return wire
    head, end = wire_header(wire)
    if edits.subject is None:
        # Rspamd asks for removals on every message (its milter_headers routines
        # remove the fields they add); mostly there is none of them to remove.
        folded = head.lower()
        if not any(n.lower().encode("ascii", "replace") in folded for n, _ in edits.remove):
            return wire
    fields = _fields(head)
    by_name: dict[bytes, list[int]] = {}
    for i, (field, _, _) in enumerate(fields):
        by_name.setdefault(field, []).append(i)
    drop: set[int] = set()
    for name, which in edits.remove:
        found = by_name.get(name.lower().encode("ascii", "replace"), [])
        if which == 0:
            drop.update(found)
        elif 0 < which <= len(found):
            drop.add(found[which - 1])
        elif which < 0 and -which <= len(found):
            drop.add(found[which])
    subject = b""
    first_subject = -1
    if edits.subject is not None and _SAFE_VALUE.fullmatch(edits.subject):
        subject = b"Subject: " + edits.subject.encode("ascii") + b"\r\n"
        subjects = by_name.get(b"subject", [])
        if subjects:
            first_subject = subjects[0]
            drop.update(subjects[1:])
    if not drop and not subject:
        return wire
    kept = []
    for i, (_, start, stop) in enumerate(fields):
        if i == first_subject:
            kept.append(subject)
        elif i not in drop:
            kept.append(head[start:stop])
    if subject and first_subject < 0:
        kept.append(subject)
    return b"".join((stuff(b"".join(kept)), memoryview(wire)[end:]))


def _fields(head: bytes) -> list[tuple[bytes, int, int]]:
    """Each field of a header section (unstuffed, CRLF lines): its name in lower
    case, where it starts and where it ends (after its last line's CRLF)."""
    out = []
    pos, size = 0, len(head)
    while pos < size:
        stop = _field_end(head, pos)
        colon = head.find(b":", pos, stop)
        name = head[pos:colon].rstrip(b" \t").lower() if colon >= 0 else b""
        out.append((name, pos, stop))
        pos = stop
    return out


def _field_end(head: bytes, pos: int) -> int:
    """Where the field that goes on at `pos` ends: after the CRLF of its last line
    (the next line that does not start with white space begins another)."""
    i = head.find(b"\r\n", pos)
    while i >= 0 and head[i + 2 : i + 3] in (b" ", b"\t"):
        i = head.find(b"\r\n", i + 2)
    return len(head) if i < 0 else i + 2


def authentication_results(authserv_id: str, results: list[AuthResult]) -> bytes:
    """Our Authentication-Results header (RFC 8601), folded, via authres."""
    key = tuple((r.method, r.result, tuple(r.props.items()), r.reason) for r in results)
    return _cached_results(authserv_id, key)


@functools.lru_cache(maxsize=4096)
def _cached_results(
    authserv_id: str, key: tuple[tuple[str, str, tuple[tuple[str, str], ...], str], ...]
) -> bytes:
    """authres costs about 40 µs per header; a repeat sender (or no checks at all)
    produces the same results, and so the same bytes, message after message."""
    results = [AuthResult(m, res, dict(props), reason) for m, res, props, reason in key]
    return _format_results(authserv_id, results)


def _format_results(authserv_id: str, results: list[AuthResult]) -> bytes:
    import authres
    import authres.arc
    import authres.dmarc

    items: list[Any] = []
    for r in results:
        kw = {k.replace(".", "_"): _pvalue(v) for k, v in r.props.items()}
        comment = _UNSAFE_COMMENT.sub(" ", r.reason)[:120] if r.reason else None
        if r.method == "spf":
            items.append(
                authres.SPFAuthenticationResult(result=r.result, result_comment=comment, **kw)
            )
        elif r.method == "dkim":
            items.append(
                authres.DKIMAuthenticationResult(
                    result=r.result,
                    result_comment=comment,
                    header_d=kw.get("header_d"),
                    header_s=kw.get("header_s"),
                    header_a=kw.get("header_a"),
                )
            )
        elif r.method == "arc":
            items.append(
                authres.arc.ARCAuthenticationResult(
                    result=r.result,
                    result_comment=comment,
                    smtp_remote_ip=kw.get("smtp_remote-ip"),
                )
            )
        elif r.method == "dmarc":
            items.append(
                authres.dmarc.DMARCAuthenticationResult(
                    result=r.result,
                    result_comment=comment,
                    header_from=kw.get("header_from"),
                    policy=kw.get("policy_dmarc"),
                )
            )
        else:
            items.append(
                authres.AuthenticationResult(
                    method=r.method, result=r.result, result_comment=comment
                )
            )
    if not items:
        items = [authres.NoneAuthenticationResult()]
    text = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=items))
    return _fold(text).encode("utf-8", "replace") + b"\r\n"


_UNSAFE_COMMENT = re.compile(r"[()\\\r\n\x00-\x1f\x7f]")
# What a property value (RFC 8601 pvalue) may hold as we write it: a domain, an
# address literal, a local-part@domain. authres quotes nothing, and the values come
# from the client (its HELO, its sender's domain, the d= of a signature): a ";" or
# white space in one would begin results of the client's own in our field.
_PVALUE_UNSAFE = re.compile(r"[^A-Za-z0-9.!#$%&'*+/=?^_`{|}~@:\[\]\x80-\U0010ffff-]")


def _pvalue(value: str) -> str:
    """`value` with every character a reader could take for syntax made "?" (as our
    Received field does with a HELO), non-ASCII controls and spaces included."""
    value = _PVALUE_UNSAFE.sub("?", value)
    if not value.isascii():
        value = "".join("?" if unicodedata.category(c)[0] in "CZ" else c for c in value)
    return value or "?"


def _fold(text: str, width: int = 78) -> str:
    """Fold at '; ' and spaces so no line exceeds the RFC 5322 recommendation."""
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = "\t" + word
        else:
            line = f"{line} {word}" if line else word
    out.append(line)
    return "\r\n".join(out)
