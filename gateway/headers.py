"""Headers the gateway adds: Received (RFC 5321 4.4) and policy tags."""

from __future__ import annotations

import contextlib
import functools
import re
import time
from email.header import decode_header, make_header
from email.utils import formatdate
from typing import Any

from gateway.pipeline.results import AuthResult

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


def header_section(message: bytes) -> bytes:
    """The header fields and the blank line after them (all of it if there is none).

    Checks that only read headers use this, so their work is bounded by the
    header size, not the message size.
    """
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]


_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")


def too_many_received(wire: bytes, limit: int) -> bool:
    """Whether the header section holds more than `limit` Received fields (the
    body is never read).

    Why two steps: this runs on every message. A case-folded count of the lines
    that start with "received" (Received-SPF too) bounds the answer for the
    price of one copy of the header section; only a message past that bound
    pays for the exact count of field names.
    """
    head = header_section(wire)
    folded = head.lower()
    if folded.count(b"\nreceived") + folded.startswith(b"received") <= limit:
        return False
    return len(_RECEIVED.findall(head)) > limit


_AR_NAME = re.compile(rb"(?i)^authentication-results[ \t]*:")
_AR_ANYWHERE = re.compile(rb"(?im)^authentication-results[ \t]*:")
_COMMENT = re.compile(r"\([^()]*\)")


def _authserv_id(value: str) -> str:
    """The authserv-id of an A-R value as any reader might take it: comments and
    folding removed, a quoted-string unquoted, encoded words decoded (not valid in
    this structured field, but some readers decode them anyway), case and a trailing
    dot ignored. Anything that could read as our name counts as our name."""
    v = value
    for _ in range(3):  # nested comments, a few levels
        v = _COMMENT.sub(" ", v)
    v = v.split(";", 1)[0].strip()
    if not v:
        return ""
    if v.startswith('"'):
        end = v.find('"', 1)
        token = v[1:end] if end > 0 else v[1:]
        token = token.replace("\\", "")
    else:
        token = v.split()[0]
    if "=?" in token:
        with contextlib.suppress(ValueError, LookupError):  # undecodable: compared as is
            token = str(make_header(decode_header(token)))
    return token.strip().rstrip(".").lower()


def strip_forged_ar(wire: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Remove Authentication-Results header fields that claim our authserv-id.

    Works on the wire form (stuffed) of the header section only; the body is
    never touched. Returns the new bytes and how many fields were removed.
    """
    section = header_section(wire)
    head_end = len(section) - 2 if section.endswith(b"\r\n\r\n") else len(section)
    head = wire[:head_end]
    if not _AR_ANYWHERE.search(head):
        return wire, 0  # the common case costs one search
    ours = authserv_id.rstrip(".").lower()
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    kept, removed = [], 0
    for f in fields:
        if _AR_NAME.match(f[0]):
            value = b" ".join(x.strip() for x in f).split(b":", 1)[1]
            if _authserv_id(value.decode("utf-8", "replace")) == ours:
                removed += 1
                continue
        kept.append(b"\r\n".join(f) + b"\r\n")
    if not removed:
        return wire, 0
    return b"".join(kept) + wire[head_end:], removed


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
        kw = {k.replace(".", "_"): v for k, v in r.props.items()}
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
                    smtp_remote_ip=r.props.get("smtp.remote-ip"),
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
