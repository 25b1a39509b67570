"""Address-list values (gateway/addrlist.py): what may go to the email package's parsers."""

from __future__ import annotations

import pytest

from gateway.addrlist import MAX_COMMENTS, plain, too_complex


@pytest.mark.parametrize(
    "value",
    [' "a" <a@old.example>', " a@old.example (c)", " g: a@old.example;", " a.b <a@old.example>"],
)
def test_values_with_quotes_comments_groups_or_dotted_names_are_not_plain(value: str) -> None:
    assert not plain(value)


@pytest.mark.parametrize(
    "value",
    [
        " a@example.test",
        " a@example.test, b@example.test",
        " John Doe <john@example.test>",
        "\r\n\tJohn <j@x.test>,\r\n b@y.test",
        " o'brien@example.test",
    ],
)
def test_addresses_and_plain_display_names_are_plain(value: str) -> None:
    assert plain(value)


@pytest.mark.parametrize(
    "value",
    [
        " a@example.test,",  # an empty member
        " a@[192.0.2.1]",  # a domain literal
        " j\u00f6rg@example.test",  # not ASCII
        " a\\@b@example.test",  # an escape
        " <a@example.test>",  # angle brackets without a name
        " a@example.test b@example.test",  # two addresses, no comma
    ],
)
def test_what_a_parser_might_read_otherwise_is_not_plain(value: str) -> None:
    assert not plain(value)


def test_too_complex_bounds_the_length_and_the_comments() -> None:
    assert not too_complex("(c)" * MAX_COMMENTS, 1000)
    assert too_complex("(c)" * (MAX_COMMENTS + 1), 1000)
    assert not too_complex("x" * 100, 100)
    assert too_complex("x" * 101, 100)
