"""RFC 3461 delivery status notification parameters, and the xtext they are written in.

The gateway holds no queue, so it never writes a DSN itself: the backend does.
What the gateway owes the sender is that the request reaches it intact. So the
parameters are checked here (a malformed one is refused at once, with 501 5.5.4,
rather than by the backend later, when the client has moved on), decoded and
checked for what they stand for (xtext can spell CR and LF as "+0D+0A", which a
backend would put into the DSN it writes), re-encoded, and dropped only for a
backend that does not offer DSN, which would refuse them (555).

XCLIENT and XFORWARD attribute values are xtext too, hence `xtext()` here.
"""

from __future__ import annotations

import re

_XCHAR = re.compile(r"[!-*,-<>-~]*")  # xchar: 33-126 except "+" and "="
# RFC 3461 4: xtext, every "+" followed by two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
# RFC 6533 3: utf-8-addr-unitext (UTF-8 allowed, with SMTPUTF8) and its ASCII form
# utf-8-addr-xtext: QCHAR (no "+", "=" or "\") or an embedded \x{HEXPOINT}.
_UNITEXT = re.compile(r"(?:[!-*,-<>-\[\]-~\u0080-\U0010ffff]|\\x\{[0-9A-F]{2,6}\})*")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2
_NOTIFY_ANY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAIL_KEYS = frozenset({"RET", "ENVID"})
RCPT_KEYS = frozenset({"NOTIFY", "ORCPT"})


def xtext(value: str) -> str:
    """`value` as RFC 3461 xtext: "+", "=" and anything outside 33-126 as +XX."""
    if _XCHAR.fullmatch(value):
        return value  # nearly always: addresses and host names
    return _xtext_bytes(value.encode("utf-8", "surrogateescape"))


def _xtext_bytes(value: bytes) -> str:
    out = []
    for ch in value:
        if 33 <= ch <= 126 and ch not in (43, 61):
            out.append(chr(ch))
        else:
            out.append(f"+{ch:02X}")
    return "".join(out)


_HEX_SPLIT = re.compile(r"(\+[0-9A-F]{2})")
_UNIHEX = re.compile(r"\\x\{([0-9A-F]{2,6})\}")


def _unxtext(value: str) -> bytes | None:
    """Well-formed xtext decoded to the octets it stands for, when they hold no
    control character (C0 or DEL); octets of 128 and up are kept as they are (the
    UTF-8 of a name, say), never read as Latin-1."""
    if not _XTEXT.fullmatch(value):
        return None
    out = bytearray()
    for piece in _HEX_SPLIT.split(value):
        if piece[:1] == "+":
            out.append(int(piece[1:], 16))
        else:
            out += piece.encode("ascii")
    return None if any(b < 0x20 or b == 0x7F for b in out) else bytes(out)


def _clean(text: str) -> bool:
    """No control characters (C0, DEL, C1) in what a parameter stands for, and no
    lone surrogate (how invalid UTF-8 on the command line arrives here)."""
    return not any(
        ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) <= 0xDFFF for c in text
    )


def mail_param(key: str, value: str | None) -> str | None:
    """RET or ENVID as it goes to the backend; None if malformed."""
    if value is None:
        return None
    if key == "RET":
        ret = value.upper()
        return f"RET={ret}" if ret in ("FULL", "HDRS") else None
    if 0 < len(value) <= MAX_ENVID:  # ENVID
        decoded = _unxtext(value)
        if decoded is not None:
            return f"ENVID={_xtext_bytes(decoded)}"
    return None


def rcpt_param(key: str, value: str | None, utf8: bool) -> str | None:
    """NOTIFY or ORCPT as it goes to the backend; None if malformed. `utf8`: the
    transaction is SMTPUTF8, so ORCPT=utf-8; may carry UTF-8 (RFC 6533)."""
    if value is None:
        return None
    if key == "NOTIFY":
        words = value.upper().split(",")
        if words == ["NEVER"] or (len(set(words)) == len(words) and _NOTIFY_ANY.issuperset(words)):
            return "NOTIFY=" + ",".join(words)
        return None
    kind, semi, addr = value.partition(";")  # ORCPT
    if not semi or not addr or len(value) > MAX_ORCPT or not _ATOM.fullmatch(kind):
        return None
    if kind.lower() == "utf-8":
        ok = (utf8 or addr.isascii()) and _UNITEXT.fullmatch(addr) is not None
        if ok and not _clean(_UNIHEX.sub(lambda m: _codepoint(m.group(1)), addr)):
            ok = False
        return f"ORCPT={kind};{addr}" if ok else None
    decoded = _unxtext(addr)
    return None if decoded is None else f"ORCPT={kind};{_xtext_bytes(decoded)}"


def _codepoint(hexdigits: str) -> str:
    n = int(hexdigits, 16)
    return chr(n) if n <= 0x10FFFF and not 0xD800 <= n <= 0xDFFF else "\x00"


def orcpt_for(original: str) -> str | None:
    """The ORCPT a rewritten recipient carries, so that the backend's DSNs name the
    address the sender used (RFC 3461 4.2's Original-Recipient). None for a UTF-8
    address: its utf-8 form would need the whole transaction to be SMTPUTF8."""
    if not original.isascii():
        return None
    value = f"rfc822;{xtext(original)}"
    return f"ORCPT={value}" if len(value) <= MAX_ORCPT else None


def for_backend(params: list[str], extensions: dict[str, str], keys: frozenset[str]) -> list[str]:
    """`params` without the DSN ones (`keys`) when this backend session lacks DSN."""
    if not params or "DSN" in extensions:
        return params
    return [p for p in params if p.partition("=")[0] not in keys]
