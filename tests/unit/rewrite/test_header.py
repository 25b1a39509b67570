"""Rewriting the addresses in a message's header fields (gateway/rewrite/header.py),
and nothing else; bounded (pure logic; the SMTP path is in
tests/integration/test_rewrite.py)."""

from __future__ import annotations

import pytest

from gateway.address import Address
from gateway.addrlist import MAX_COMMENTS, plain
from gateway.rewrite.header import LIBRARY_BUDGET, MAX_ADDRESSES, rewrite_headers, rewrite_value


def test_a_message_that_starts_with_an_empty_line_has_no_headers_to_rewrite() -> None:
    wire = b"\r\nFrom: a@old.example\r\nTo: b@old.example\r\n\r\nbody\r\n"
    assert rewrite_headers(wire, old_to_new, old_to_new) == (wire, 0)


def old_to_new(x: Address) -> Address | None:
    return Address(x.local, "example.org") if x.domain == "old.example" else None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (' "Doe, John" <john@old.example>', ' "Doe, John" <john@example.org>'),
        (' "Say \\"hi\\", Bob" <bob@old.example>', ' "Say \\"hi\\", Bob" <bob@example.org>'),
        (
            " =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jm@old.example>",
            " =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jm@example.org>",
        ),
        (
            " Team: a@old.example, b@other.test;, c@old.example (Carol)",
            " Team: a@example.org, b@other.test;, c@example.org (Carol)",
        ),
        (
            ' x@other.test,\r\n\t"old.example" <y@old.example>',
            ' x@other.test,\r\n\t"old.example" <y@example.org>',
        ),
        (" <@relay.test:z@old.example>", " <@relay.test:z@example.org>"),
    ],
)
def test_header_values_change_only_address_parts(value: str, expected: str) -> None:
    assert rewrite_value(value, old_to_new) == expected


@pytest.mark.parametrize(
    "value",
    [
        " someone@other.test",  # must not match
        ' "john@old.example" <john@other.test>',  # the look-alike is a display name
        " undisclosed-recipients:;",
        " broken <<x@old.example>",  # not readable with certainty: left alone
        " (comment only)",
    ],
)
def test_header_values_left_alone(value: str) -> None:
    assert rewrite_value(value, old_to_new) is None


def test_headers_of_a_message_only_address_fields_and_bytes_kept() -> None:
    wire = (
        b"Received: from x by y; Sun, 22 Nov 2026 08:00:00 +0000\r\n"
        b'From: "Doe, John" <john@old.example>\r\n'
        b"To: a@old.example,\r\n b@other.test\r\n"
        b"Subject: mail for john@old.example\r\n"
        b"X-Note: john@old.example\r\n"
        b"\r\n"
        b"From: body@old.example stays\r\n"
    )
    out, n = rewrite_headers(wire, old_to_new, old_to_new)
    assert n == 2
    assert out == wire.replace(b"<john@old.example>", b"<john@example.org>").replace(
        b"To: a@old.example", b"To: a@example.org"
    )
    untouched, n = rewrite_headers(wire, lambda x: None, lambda x: None)
    assert n == 0 and untouched is wire


def test_header_rewrite_never_injects_lines() -> None:
    def evil(x: Address) -> Address | None:
        return Address("a\r\nBcc: x", "example.org")

    wire = b"From: j@old.example\r\n\r\nbody\r\n"
    out, n = rewrite_headers(wire, evil, None)
    assert n == 0 and out == wire


@pytest.mark.parametrize(
    "value",
    [
        " a@old.example",
        " John Doe <john@old.example>, b@other.test",
        "\r\n\tx@old.example ,y@old.example",
    ],
)
def test_plain_values_need_no_library_and_read_as_it_does(value: str) -> None:
    """A plain value is rewritten without the email package's parser, and exactly as
    that parser reads it (the cross-check, forced by a comment, gives the same)."""
    assert plain(value)
    assert rewrite_value(value, old_to_new) == rewrite_value(value + " ()", old_to_new)[:-3]  # type: ignore[index]


def test_a_value_of_more_comments_than_the_bound_is_left_alone() -> None:
    bounded = " a@old.example " + "(c)" * MAX_COMMENTS
    assert rewrite_value(bounded, old_to_new) == bounded.replace("old.example", "example.org")
    assert rewrite_value(bounded + "(c)", old_to_new) is None
    nested = " a@old.example " + "(" * 2000 + ")" * 2000  # once a RecursionError
    assert rewrite_value(nested, old_to_new) is None


def test_the_library_reads_at_most_one_budget_of_each_message() -> None:
    """Values the library must confirm share one budget per message; past it, fields
    are left as they were. Plain ones cost none of it."""
    value = ' "x" <a@old.example>'  # quoted: not plain
    fields = b"".join(b"To:" + value.encode() + b"\r\n" for _ in range(300))
    plains = b"Cc: a@old.example\r\n" * 500
    out, n = rewrite_headers(fields + plains + b"\r\nbody\r\n", old_to_new, old_to_new)
    assert n == LIBRARY_BUDGET // len(value) + 500
    assert out.count(b"<a@example.org>") == LIBRARY_BUDGET // len(value)


def test_the_rewriter_reads_at_most_max_addresses_of_each_message() -> None:
    plains = b"Cc: a@old.example, b@old.example\r\n" * (MAX_ADDRESSES // 2 + 100)
    out, n = rewrite_headers(plains + b"\r\nbody\r\n", old_to_new, old_to_new)
    assert n == MAX_ADDRESSES // 2
    assert out.count(b"@example.org") == MAX_ADDRESSES
