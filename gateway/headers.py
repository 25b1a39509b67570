"""Headers the gateway adds: Received (RFC 5321 4.4) and policy tags."""

from __future__ import annotations

import re
import time
from email.utils import formatdate

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _clean(s: str, limit: int = 255) -> str:
    """Client-chosen text (HELO) reduced to printable ASCII without spaces."""
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
    return f"{name}: {', '.join(symbols)}\r\n".encode("ascii", "replace")
