"""Rewriting the addresses inside From/Sender/Reply-To/To/Cc, and nothing else.

The value is not re-serialised: we find the byte span of each addr-spec with a
small RFC 5322 scanner (quoted strings, comments, angle brackets, groups,
domain literals) and replace only those spans, so display names, comments,
groups, encoded words and folding stay byte for byte. The standard library's
parser reads the same value independently; if the two disagree on what the
addresses are, the header is left alone. A header none of whose addresses
changes is never touched at all (DKIM signatures over it keep verifying).
"""

from __future__ import annotations

from collections.abc import Callable
from email._header_value_parser import get_address_list  # the RFC 5322 parser of `email`

from gateway.address import Address, AddressError, parse_path
from gateway.addrlist import plain, too_complex

SENDER_HEADERS = frozenset({b"from", b"sender", b"reply-to"})
RECIPIENT_HEADERS = frozenset({b"to", b"cc"})
MAX_LINE = 998
# Characters of address-field values per message that the email package's parser
# may read to confirm our scanner (6 to 15 µs each, by their shape: 60 ms at most). Fields past the
# budget, and values of more than MAX_COMMENTS comments, are left as they were.
LIBRARY_BUDGET = 4 * 1024
# Addresses per message the rewriter reads at all (about 25 µs each, plain ones
# included): past them, fields are left as they were.
MAX_ADDRESSES = 1000

Rewrite = Callable[[Address], Address | None]


def _skip_quoted(v: str, i: int, close: str) -> int:
    """Index after the closing quote/bracket starting at v[i]; -1 if unterminated."""
    i += 1
    while i < len(v):
        c = v[i]
        if c == "\\":
            i += 2
            continue
        if c == close:
            return i + 1
        i += 1
    return -1


def _skip_comment(v: str, i: int) -> int:
    depth = 0
    while i < len(v):
        c = v[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _trim(v: str, a: int, b: int) -> tuple[int, int] | None:
    """Shrink [a, b) past surrounding whitespace and comments; None when what is left
    still holds a comment or whitespace outside quotes (not a plain addr-spec).

    One pass, left to right: the span runs from the first character outside
    whitespace and comments to the last, and nothing of the kind may come between
    (a scan back for the comment that ends at b, one per trailing comment, was
    quadratic in them)."""
    first = last = -1
    gap = False  # whitespace or a comment after the span began
    i = a
    while i < b:
        c = v[i]
        if c in " \t\r\n":
            gap = first >= 0
            i += 1
            continue
        if c == "(":
            end = _skip_comment(v, i)
            if end < 0 or end > b:
                return None
            gap = first >= 0
            i = end
            continue
        if gap:
            return None
        if c == '"' or c == "[":
            j = _skip_quoted(v, i, '"' if c == '"' else "]")
            if j < 0 or j > b:
                return None
        else:
            j = i + 1
        if first < 0:
            first = i
        last = i = j
    return None if first < 0 else (first, last)


def addr_spans(v: str) -> list[tuple[int, int]] | None:
    """The spans of every addr-spec in an address-list value, in order; None when the
    value is not something we can edit with certainty."""
    spans: list[tuple[int, int]] = []
    seg, angle, has_angle, in_group = 0, -1, False, False
    i, n = 0, len(v)

    def close(end: int) -> bool:
        if has_angle:
            return True
        if not v[seg:end].strip(" \t\r\n"):
            return True  # empty member (", ," or "group:;")
        t = _trim(v, seg, end)
        if t is None:
            return False
        spans.append(t)
        return True

    while i < n:
        c = v[i]
        if c == '"' or (c == "[" and angle < 0):
            i = _skip_quoted(v, i, '"' if c == '"' else "]")
            if i < 0:
                return None
            continue
        if c == "(":
            i = _skip_comment(v, i)
            if i < 0:
                return None
            continue
        if c == "<":
            if angle >= 0 or has_angle:
                return None
            angle = i + 1
        elif c == ">":
            if angle < 0:
                return None
            a = angle
            inner = v[a:i].lstrip(" \t")
            if inner.startswith("@"):  # obsolete route: @a,@b:addr
                colon = v.find(":", a, i)
                if colon < 0:
                    return None
                a = colon + 1
            t = _trim(v, a, i)
            if t is None:
                return None
            spans.append(t)
            angle, has_angle = -1, True
        elif angle >= 0:
            pass
        elif c == ":":
            if in_group:
                return None
            in_group, seg = True, i + 1
        elif c == ";":
            if not in_group or not close(i):
                return None
            in_group, seg, has_angle = False, i + 1, False
        elif c == ",":
            if not close(i):
                return None
            seg, has_angle = i + 1, False
        i += 1
    if angle >= 0 or in_group:
        return None
    if not close(n):
        return None
    return spans


def _library_view(v: str) -> list[tuple[str, str]] | None:
    try:
        parsed, rest = get_address_list(v.replace("\r\n", ""))  # unfolded, as it expects
    except Exception:  # the stdlib parser raises several private error types
        return None
    if rest.strip():
        return None
    out: list[tuple[str, str]] = []

    def walk(token: object) -> None:
        if getattr(token, "token_type", None) == "addr-spec":
            local = getattr(token, "local_part", None) or ""
            domain = getattr(token, "domain", None) or ""
            out.append((local.lower(), domain.lower()))
            return
        if isinstance(token, list):
            for t in token:
                walk(t)

    walk(parsed)
    return out


class Budget:
    """What is left of one message's LIBRARY_BUDGET and MAX_ADDRESSES."""

    __slots__ = ("addresses", "left")

    def __init__(self, left: int = LIBRARY_BUDGET, addresses: int = MAX_ADDRESSES) -> None:
        self.left = left
        self.addresses = addresses

    def take(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        return True


def rewrite_value(value: str, rewrite: Rewrite, budget: Budget | None = None) -> str | None:
    """The value with each rewritten address in place, or None when nothing changed
    (or the value could not be read with certainty: then it is left as it was).

    A plain value is read one way only; any other is read by the email package's
    parser as well, and left alone unless both agree: within `budget` (a fresh
    LIBRARY_BUDGET if none) and with at most MAX_COMMENTS comments."""
    budget = budget or Budget()
    easy = plain(value)
    if not easy and (too_complex(value, budget.left) or not budget.take(len(value))):
        return None
    spans = addr_spans(value)
    if not spans or len(spans) > budget.addresses:
        return None
    budget.addresses -= len(spans)
    addrs: list[Address | None] = []
    for a, b in spans:
        text = value[a:b]
        try:
            addrs.append(parse_path(f"<{text}>"))
        except AddressError:
            addrs.append(None)
    if not easy:
        lib = _library_view(value)
        ours = [(x.local.lower(), x.domain) if x else None for x in addrs]
        if lib is None or len(lib) != len(ours):
            return None
        if any(o is not None and o != pair for o, pair in zip(ours, lib, strict=True)):
            return None
    out, last, changed = [], 0, False
    for (a, b), addr in zip(spans, addrs, strict=True):
        new = rewrite(addr) if addr is not None else None
        if new is None or new == addr:
            continue
        text = str(new)
        if any(c in text for c in "\r\n\0"):
            return None  # make_address forbids it; belt and braces for a header
        out.append(value[last:a])
        out.append(text)
        last, changed = b, True
    if not changed:
        return None
    out.append(value[last:])
    return "".join(out)


def rewrite_headers(
    wire: bytes, sender: Rewrite | None, recipient: Rewrite | None
) -> tuple[bytes, int]:
    """Rewrite the address headers of a (dot-stuffed) message; returns (wire, count of
    headers changed). Only the header section is read; the body is never copied
    unless a header changed."""
    if wire[:2] == b"\r\n":
        return wire, 0  # starts with an empty line: no header fields (wire.header_section)
    end = wire.find(b"\r\n\r\n")
    head_len = len(wire) if end < 0 else end + 2
    head = wire[:head_len]
    lines = head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n")
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    changed = 0
    out: list[bytes] = []
    budget = Budget()
    for f in fields:
        name, colon, _ = f[0].partition(b":")
        key = name.strip().lower()
        fn = sender if key in SENDER_HEADERS else recipient if key in RECIPIENT_HEADERS else None
        if fn is None or not colon or name.startswith(b"."):
            out.append(b"\r\n".join(f))
            continue
        raw = b"\r\n".join(f)
        value = raw[len(name) + 1 :].decode("utf-8", "surrogateescape")
        new = rewrite_value(value, fn, budget)
        if new is None:
            out.append(raw)
            continue
        field = name + b":" + new.encode("utf-8", "surrogateescape")
        if any(len(line) > MAX_LINE for line in field.split(b"\r\n")):
            out.append(raw)  # would exceed RFC 5322's line limit: leave it as it was
            continue
        out.append(field)
        changed += 1
    if not changed:
        return wire, 0
    # The body joined through a view: one copy of a large message, not two.
    return b"".join((b"\r\n".join(out), b"\r\n", memoryview(wire)[head_len:])), changed
