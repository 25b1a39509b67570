"""Envelope address parsing (RFC 5321 4.1.2), on the hot path.

Most real paths are plain `<local@domain>`; one compiled regex takes those.
Everything else (quoted local parts, source routes, address literals, UTF-8)
goes through a small hand parser that records exactly what it saw, so relay
control can judge tricks like `"user@remote"@local` or `@local:user@remote`
instead of the parser silently normalising them away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import idna

from gateway.dns import ascii_name

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_FAST = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>"
)
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL = re.compile(
    r"^[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?$"
)
# C0, DEL, C1 (NEL among them) and the Unicode line and paragraph separators: a
# backend may read any of them as the end of a line or a space.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class AddressError(ValueError):
    """The path is not valid RFC 5321 syntax."""


class DomainSpellingError(AddressError):
    """A UTF-8 domain that is not exactly a valid IDNA 2008 U-label spelling: what
    relay control judges (its A-labels) and what a backend offering SMTPUTF8 would
    receive (the raw spelling: a soft hyphen, a zero-width space, a full-width dot
    or the ideographic full stop in it) would differ. Refused (553 5.1.3)."""


# Lone surrogates are how the command line's invalid UTF-8 reaches here
# (surrogateescape): an address holding one is not UTF-8 at all.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed envelope path. `local` is unquoted; `domain` is lower-cased."""

    local: str
    domain: str
    quoted: bool = False
    route: tuple[str, ...] = ()
    literal: bool = False

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def utf8(self) -> bool:
        return not (self.local.isascii() and self.domain.isascii())

    def __str__(self) -> str:
        """The mailbox as it goes on the wire to the backend (no route: RFC 5321 C)."""
        if self.is_null:
            return ""
        if not self.domain:  # RFC 5321 4.5.1's <Postmaster>, the one path without a domain
            return quote_local(self.local)
        return f"{quote_local(self.local)}@{self.domain}"

    @property
    def path(self) -> str:
        return f"<{self}>"


NULL = Address("", "")


def ascii_path(path: str) -> str | None:
    """`local@domain` for a next hop without SMTPUTF8: a UTF-8 domain as A-labels
    (RFC 5890: the same domain, in the form every MTA takes), as Postfix does. A
    UTF-8 local part has no ASCII form (RFC 6531 leaves none), hence None, as for
    a domain that cannot be converted."""
    if path.isascii():
        return path
    local, at, domain = path.rpartition("@")
    if not at or not local.isascii():
        return None
    domain = ascii_name(domain)
    return f"{local}@{domain}" if domain.isascii() and "\\" not in domain else None


def quote_local(local: str) -> str:
    if _is_dot_atom(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _is_dot_atom(s: str) -> bool:
    """RFC 5321 Dot-string (atext, and any non-ASCII for SMTPUTF8 / RFC 6531)."""
    return _DOT_ATOM.fullmatch(s) is not None


def split_path(arg: str) -> tuple[str, str]:
    """Split `<path> params` into the path text (with brackets) and the rest.

    Walks the quoted string so a `>` inside quotes does not end the path.
    """
    if not arg.startswith("<"):
        raise AddressError("path must be enclosed in <>")
    end = arg.find(">")
    if end > 0 and '"' not in arg[:end]:
        return arg[: end + 1], arg[end + 1 :]  # no quoted string: the first ">" ends it
    return _walk_path(arg)


def _walk_path(arg: str) -> tuple[str, str]:
    """split_path for a path with a quoted string, character by character."""
    i = 1
    n = len(arg)
    quoted = False
    while i < n:
        c = arg[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return arg[: i + 1], arg[i + 1 :]
        i += 1
    raise AddressError("unterminated path")


def parse_path(path: str, *, allow_null: bool = False) -> Address:
    """Parse `<...>` (brackets included) into an Address."""
    m = _FAST.fullmatch(path)
    if m is not None:
        local, domain = m.group(1), m.group(2)
        if len(local) > MAX_LOCAL or len(domain) > MAX_DOMAIN:
            raise AddressError("address too long")
        if len(domain) > 63 and any(len(label) > 63 for label in domain.split(".")):
            raise AddressError("domain label too long")
        return Address(local, domain.lower())
    if _CONTROL.search(path):
        raise AddressError("control characters in address")
    if _SURROGATE.search(path):
        raise AddressError("invalid UTF-8 in address")
    if len(path) > MAX_PATH + 2:
        raise AddressError("path too long")
    if path == "<>":
        if allow_null:
            return NULL
        raise AddressError("null path not allowed here")
    if not (path.startswith("<") and path.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = path[1:-1]
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("source route without ':'")
        hops = inner[:colon].split(",")
        route_list = []
        for hop in hops:
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            route_list.append(_parse_domain(hop[1:]))
        route = tuple(route_list)
        inner = inner[colon + 1 :]
    local, quoted, rest = _parse_local(inner)
    if not rest.startswith("@"):
        raise AddressError("missing @domain")
    dom_text = rest[1:]
    literal = dom_text.startswith("[")
    domain = _parse_literal(dom_text) if literal else _parse_domain(dom_text)
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        raise AddressError("local part too long")
    return Address(local, domain, quoted=quoted, route=route, literal=literal)


def _parse_local(s: str) -> tuple[str, bool, str]:
    if s.startswith('"'):
        out = []
        i = 1
        while i < len(s):
            c = s[i]
            if c == "\\":
                if i + 1 >= len(s):
                    raise AddressError("bad quoted-pair")
                out.append(s[i + 1])
                i += 2
                continue
            if c == '"':
                return "".join(out), True, s[i + 1 :]
            out.append(c)
            i += 1
        raise AddressError("unterminated quoted local part")
    at = s.rfind("@")
    if at < 0:
        raise AddressError("missing @domain")
    local = s[:at]
    if not _is_dot_atom(local):
        raise AddressError("bad local part")
    return local, False, s[at:]


def _parse_domain(s: str) -> str:
    if not s or len(s) > MAX_DOMAIN:
        raise AddressError("bad domain")
    labels = s[:-1].split(".") if s.endswith(".") else s.split(".")
    for label in labels:
        if not label or len(label) > 63 or not _LABEL.match(label):
            raise AddressError("bad domain")
    lowered = s.lower()
    if not s.isascii():
        # Lowering is a mapping too (U+212A KELVIN SIGN becomes "k", "Ü" becomes "ü"):
        # what the backend receives is the lowered form, so it must be what was written.
        if [c for c in s if not c.isascii()] != [c for c in lowered if not c.isascii()]:
            raise DomainSpellingError(f"{s!r} changes when lower-cased")
        _check_ulabels(lowered)
    s = lowered
    # A trailing dot is kept: "local." is not "local", and relay control must see that.
    return s


def _check_ulabels(domain: str) -> None:
    """Every non-ASCII label must be a valid IDNA 2008 U-label that is its own
    A-label's spelling: nothing mapped or ignored (UTS 46 would fold a full-width
    letter, drop a soft hyphen, take U+3002 for a dot), so that the backend receives
    exactly the domain relay control judged."""
    for label in domain.rstrip(".").split("."):
        if label.isascii():
            continue
        try:
            same = idna.ulabel(idna.alabel(label)) == label
        except (idna.IDNAError, UnicodeError):
            same = False
        if not same:
            raise DomainSpellingError(f"{label!r} is not a valid IDNA 2008 U-label")


def _parse_literal(s: str) -> str:
    if not s.endswith("]") or len(s) < 3:
        raise AddressError("bad address literal")
    body = s[1:-1]
    if not re.fullmatch(r"[\x21-\x5a\x5e-\x7e]+", body):
        raise AddressError("bad address literal")
    return s.lower()
