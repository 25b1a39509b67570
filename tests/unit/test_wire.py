"""The wire form of a message (gateway/wire.py): stuffing, bare CR/LF, the numbers a
peer writes, the header section."""

from __future__ import annotations

import pytest

from gateway.wire import (
    has_bare_cr_lf,
    header_section,
    normalise,
    number,
    pieces,
    stuff,
    unstuff,
    unstuff_pieces,
    wire_header,
)


def test_stuff_and_unstuff_are_inverse() -> None:
    content = b".a\r\nb\r\n.\r\n..c\r\n"
    assert stuff(content) == b"..a\r\nb\r\n..\r\n...c\r\n"
    assert unstuff(stuff(content)) == content
    assert stuff(b"no newline") == b"no newline\r\n"
    assert stuff(b"") == b""


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"a\r\nb\r\n", False),
        (b"", False),
        (b"a", False),
        (b"\r\n\r\n", False),
        (b"a\nb\r\n", True),
        (b"a\rb\r\n", True),
        (b"a\r\r\n", True),
        (b"a\n\r", True),
        (b"\r", True),
        (b"\n", True),
        (b"a\r\nb", False),
        (b"x\ry\nz\r\n", True),
    ],
)
def test_has_bare_cr_lf(data: bytes, bare: bool) -> None:
    from gateway.wire import has_bare_cr_lf

    assert has_bare_cr_lf(data) is bare


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("025", 25),
        (b"4096", 4096),
        ("18446744073709551615", 2**64 - 1),  # 20 digits: any 64-bit value
        ("", None),
        ("123456789012345678901", None),  # 21 digits
        ("\u00b2", None),  # str.isdigit() is true for these; int() reads some of them
        ("\u0661\u0662", None),
        ("\u2460", None),
        ("+5", None),
        ("-5", None),
        (" 5", None),
        ("5 ", None),
        ("1_000", None),
        (b"12\xff", None),
    ],
)
def test_number_reads_ascii_digits_only_and_only_so_many(
    text: str | bytes, value: int | None
) -> None:
    assert number(text) == value


def test_number_takes_its_own_bound() -> None:
    assert number("1234", max_digits=4) == 1234
    assert number("12345", max_digits=4) is None


@pytest.mark.parametrize(
    ("message", "section"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n", b"A: 1\r\nB: 2\r\n\r\n"),
        (b"A: 1\r\n", b"A: 1\r\n"),  # no empty line: all of it
        (b"\r\nA: 1\r\n\r\nbody\r\n", b"\r\n"),  # RFC 5322 2.1: no header fields
        (b"", b""),
    ],
)
def test_the_header_section_ends_at_the_first_empty_line(message: bytes, section: bytes) -> None:
    assert header_section(message) == section


def test_wire_header_is_unstuffed_and_says_where_the_rest_begins() -> None:
    wire = b".Authentication-Results: x\r\nSubject: s\r\n\r\n..body\r\n"
    fields, end = wire_header(wire)
    assert fields == b"Authentication-Results: x\r\nSubject: s\r\n"
    assert wire[end:] == b"\r\n..body\r\n"
    assert wire_header(b"\r\nbody\r\n") == (b"", 0)


def test_pieces_never_cut_a_line_and_join_to_the_whole() -> None:
    data = b"".join(b"line %d\r\n" % i for i in range(500)) + b"tail"
    parts = list(pieces(data, 64))
    assert b"".join(parts) == data
    assert len(parts) > 10
    assert all(p.endswith(b"\r\n") for p in parts[:-1])
    assert list(pieces(b"", 64)) == []


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
def test_unstuffing_by_pieces_is_unstuffing(size: int) -> None:
    wire = b"..a\r\n" + b"".join(b".line %d\r\n..\r\nx\r\n" % i for i in range(200))
    assert unstuff_pieces(wire, size) == unstuff(wire)


@pytest.mark.parametrize("size", [1, 5, 64, 1 << 20])
@pytest.mark.parametrize(
    "wire",
    [
        b"a\r\nb\nc\rd\r\n",
        b".x\n.y\r.z\r\n",
        b"..dot\r\n.\n..\r",
        b"no end",
        b"",
        b"\n\n\r\r",
    ],
)
def test_normalise_makes_every_line_end_crlf_and_keeps_the_stuffing(wire: bytes, size: int) -> None:
    """The model: unstuff at the client's CRLFs, make every CR, LF and CRLF a CRLF,
    stuff again. Pieces of any size give the same."""
    content = unstuff(wire).replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    assert normalise(wire, size) == stuff(content)


def test_a_large_message_is_judged_for_bare_cr_lf_like_a_small_one() -> None:
    """Past 64 KiB the check counts pairs instead of translating, a piece of 1 MiB at a
    time; a pair cut in two by a piece's end is still a pair."""
    cut = 1 << 20
    big = b"x" * (cut - 1) + b"\r\n" + b"y" * 1000 + b"\r\n"  # CR ends a piece, LF begins one
    assert big[cut - 1 : cut + 1] == b"\r\n"
    assert not has_bare_cr_lf(big)
    for i in (0, 5, cut - 2, cut + 1, len(big) - 3):
        for bad in (b"\r", b"\n"):
            assert has_bare_cr_lf(big[:i] + bad + big[i + 1 :]), (i, bad)
    assert has_bare_cr_lf(big[:cut] + b"z" + big[cut + 1 :])  # the CR alone at the cut
    assert has_bare_cr_lf(big[: cut - 1] + b"z" + big[cut:])  # the LF alone after it


def test_stuffing_for_data() -> None:
    """What a mail we write ourselves (a DMARC report) goes out as: stuffed, ending
    in CRLF."""
    assert stuff(b".a\r\nb\r\n.c") == b"..a\r\nb\r\n..c\r\n"
    assert stuff(b"x\r\n") == b"x\r\n"
