"""What the wire form of a message and the numbers a peer writes mean.

Messages: the client's bytes are dot-stuffed (RFC 5321 4.5.2), and every backend
removes the leading dot of each line before it stores anything. So whatever
reads header fields to judge, count or remove them reads them unstuffed, from
`wire_header`: a field written `.Authentication-Results:` is stored as
`Authentication-Results:`, and must be judged as such.

Numbers: every number a peer writes is read here: ASCII digits only, and only so many.
Python's own readers take more than the protocols allow: `str.isdigit()` is
true for "²", "①" and "١٢", which `int()` then reads as numbers (or, for "²",
refuses with an exception nobody expected), and `int()` of a long enough
string raises ValueError (over 4,300 digits) after quadratic work.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_DIGITS = re.compile(r"[0-9]+")
_BDIGITS = re.compile(rb"[0-9]+")


def number(text: str | bytes, max_digits: int = 20) -> int | None:
    """`text` as a non-negative integer, or None if it is not 1 to `max_digits` ASCII
    digits (20 holds any 64-bit value)."""
    if not 0 < len(text) <= max_digits:
        return None
    if isinstance(text, bytes):
        return int(text) if _BDIGITS.fullmatch(text) else None
    return int(text) if _DIGITS.fullmatch(text) else None


def unstuff(wire: bytes) -> bytes:
    """RFC 5321 4.5.2: drop the leading dot of every line that has one."""
    content = wire.replace(b"\r\n.", b"\r\n")
    return content[1:] if content.startswith(b".") else content


# Pieces of a large message that one pass works on at a time: each C call on one
# holds the GIL for about a millisecond, so a thread doing the passes over 25 MB
# lets the event loop in between (one replace over all of it held it 100 ms).
PIECE = 1024 * 1024


def pieces(data: bytes, size: int = PIECE) -> Iterator[bytes]:
    """`data` in pieces of about `size` bytes, each ending just after an LF (the last
    one wherever `data` ends), so that no CRLF is cut in two."""
    pos, n = 0, len(data)
    while pos < n:
        cut = data.find(b"\n", pos + size)
        end = n if cut < 0 else cut + 1
        yield data[pos:end]
        pos = end


def unstuffed_pieces(wire: bytes, size: int = PIECE) -> list[bytes]:
    """unstuff(wire), as pieces, of a wire form whose every LF ends a CRLF (what
    check_wire lets by): each piece begins a line."""
    out = []
    for piece in pieces(wire, size):
        piece = piece.replace(b"\r\n.", b"\r\n")
        out.append(piece[1:] if piece[:1] == b"." else piece)
    return out


def unstuff_pieces(wire: bytes, size: int = PIECE) -> bytes:
    """unstuff(wire), a piece at a time (see unstuffed_pieces)."""
    return b"".join(unstuffed_pieces(wire, size))


def normalise(wire: bytes, size: int = PIECE) -> bytes:
    """The stuffed message with every line end (CRLF, bare CR, bare LF) made CRLF:
    stuff(unstuff(wire) with CRLF, CR and LF each made CRLF), one piece at a time.

    A piece begins a line of the normalised message (the one before ended in an LF,
    now a CRLF), so its leading dot is stuffed as any other line's; in the client's
    wire form it began one only after a CRLF, so only then is its leading dot the
    client's stuffing."""
    out = []
    line_start = True
    for piece in pieces(wire, size):
        content = piece.replace(b"\r\n.", b"\r\n")
        if line_start and content[:1] == b".":
            content = content[1:]
        line_start = piece.endswith(b"\r\n")
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        content = content.replace(b"\r\n.", b"\r\n..")
        out.append(b"." + content if content[:1] == b"." else content)
    result = b"".join(out)
    if result and not result.endswith(b"\r\n"):
        result += b"\r\n"
    return result


def stuff(content: bytes) -> bytes:
    """The inverse of unstuff, for content we changed or created."""
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed


def header_section(message: bytes) -> bytes:
    """The header fields and the empty line after them (all of it if there is none).

    A message that starts with an empty line has no header fields (RFC 5322 2.1):
    its header section is that line, whatever follows. Reading on to the next
    empty line instead would take a body of any size for header fields, past the
    header size limit, which does not apply to a message without them.

    Checks that only read headers use this, so their work is bounded by the
    header size, not the message size.
    """
    if message[:2] == b"\r\n":
        return b"\r\n"
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]


def wire_header(wire: bytes) -> tuple[bytes, int]:
    """The header fields of a message in its wire form, as the backend will store
    them (unstuffed, each line ending CRLF, without the empty line after them), and
    where they end in `wire`: `wire[end:]` is that empty line and the body,
    untouched. Every header check, count and removal on the wire reads this."""
    section = header_section(wire)
    end = len(section) - 2 if section.endswith(b"\r\n\r\n") else len(section)
    if section == b"\r\n":
        end = 0
    return unstuff(wire[:end]), end


_CR_ONLY = bytes(1 if i == 0x0D else 0 for i in range(256))
_LF_ONLY = bytes(1 if i == 0x0A else 0 for i in range(256))
_TRANSLATE_MAX = 64 * 1024  # beyond: three counts, half the time on a large message


def has_bare_cr_lf(wire: bytes) -> bool:
    """True if any CR or LF is not part of a CRLF pair.

    CPython has no fast primitive for this: splitlines() allocates a line object
    per line. On a message of up to 64 KiB two translate() passes do the walk at
    table-lookup speed: one keeps only the CRs (as 1), the other only the LFs of
    the message shifted left by one byte. Every CR is followed by an LF and every
    LF preceded by a CR exactly when the two agree, which one memcmp (startswith)
    decides. Beyond, counting is cheaper than the three copies: CRLF pairs never
    overlap, so the message is clean exactly when it has as many CRs, and as many
    LFs, as CRLF pairs (47 ms for 25 MB, against 94).
    """
    if not wire:
        return False
    if len(wire) > _TRANSLATE_MAX:
        # A piece at a time (each count a short hold of the GIL, for a thread); a
        # pair across a cut is counted in the piece where it starts.
        crs = lfs = pairs = 0
        for i in range(0, len(wire), PIECE):
            piece = wire[i : i + PIECE + 1]
            pairs += piece.count(b"\r\n")
            crs += piece.count(b"\r", 0, PIECE)
            lfs += piece.count(b"\n", 0, PIECE)
        return crs != pairs or lfs != pairs
    cr_map = wire.translate(_CR_ONLY)
    lf_map = wire[1:].translate(_LF_ONLY)
    return wire[0] == 0x0A or cr_map[-1] == 1 or not cr_map.startswith(lf_map)
