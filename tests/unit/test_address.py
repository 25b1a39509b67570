from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.address import (
    NULL,
    Address,
    AddressError,
    _walk_path,
    ascii_path,
    parse_path,
    split_path,
)


@pytest.mark.parametrize(
    ("path", "local", "domain"),
    [
        ("<user@example.test>", "user", "example.test"),
        ("<First.Last+tag@Example.TEST>", "First.Last+tag", "example.test"),
        ('<"john doe"@example.test>', "john doe", "example.test"),
        ('<"a\\"b"@example.test>', 'a"b', "example.test"),
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
        ("<user@example.test.>", "user", "example.test."),
        ("<jürgen@bücher.test>", "jürgen", "bücher.test"),
    ],
)
def test_parse_valid(path: str, local: str, domain: str) -> None:
    a = parse_path(path)
    assert (a.local, a.domain) == (local, domain)


@pytest.mark.parametrize(
    "path",
    [
        "user@example.test",
        "<user>",
        "<@example.test>",
        "<user@>",
        "<user@exa mple.test>",
        "<.user@example.test>",
        "<us..er@example.test>",
        "<user@-bad.test>",
        "<user@example.test",
        '<"unterminated@example.test>',
        "<user@[]>",
        "<" + "a" * 65 + "@example.test>",
        "<a@" + ("b" * 64) + ".test>",
        "<@a.test:>",
        "<a\x00@example.test>",
    ],
)
def test_parse_invalid(path: str) -> None:
    with pytest.raises(AddressError):
        parse_path(path)


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", allow_null=True) is NULL
    with pytest.raises(AddressError):
        parse_path("<>")


def test_source_route_is_recorded_not_dropped() -> None:
    a = parse_path("<@relay.test,@b.test:user@example.test>")
    assert a.route == ("relay.test", "b.test")
    assert str(a) == "user@example.test"


def test_split_path_respects_quotes() -> None:
    assert split_path('<"a>b"@example.test> SIZE=10') == ('<"a>b"@example.test>', " SIZE=10")
    with pytest.raises(AddressError):
        split_path("user@example.test")


def test_quoted_local_round_trips_on_the_wire() -> None:
    assert str(parse_path('<"john doe"@example.test>')) == '"john doe"@example.test'
    assert str(Address("plain", "example.test")) == "plain@example.test"


_ATEXT_REF = set(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")


def _dot_atom_ref(s: str) -> bool:
    """RFC 5321 Dot-string, spelled out (the reference for the compiled pattern)."""
    if not s or s.startswith(".") or s.endswith(".") or ".." in s:
        return False
    return all(c in _ATEXT_REF or c == "." or ord(c) > 127 for c in s)


@settings(max_examples=600, derandomize=True)
@given(st.text(alphabet=st.sampled_from(list('aZ9.!+=-"\\ @()<>[]:;,é\x7f\x00\t')), max_size=12))
def test_dot_atom_pattern_matches_the_rfc_definition(s: str) -> None:
    from gateway.address import _is_dot_atom

    assert _is_dot_atom(s) == _dot_atom_ref(s)


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("a@example.test", "a@example.test"),
        ("a@bücher.example", "a@xn--bcher-kva.example"),
        ("a@faß.de", "a@xn--fa-hia.de"),  # IDNA 2008: ß stays (2003 made it "ss")
        ("jörg@example.test", None),  # a UTF-8 local part has no ASCII form
        ("a@☃.net", None),  # not a valid IDNA 2008 label
    ],
)
def test_ascii_path_for_a_backend_without_smtputf8(path: str, want: str | None) -> None:
    assert ascii_path(path) == want


@settings(max_examples=800, deadline=None)
@given(st.text(alphabet='<>"\\a@ =', max_size=16).map(lambda s: "<" + s))
def test_split_path_agrees_with_the_quote_aware_walk(arg: str) -> None:
    """The shortcut for paths without a quoted string splits where the walk would."""
    try:
        want: tuple[str, str] | None = _walk_path(arg)
    except AddressError:
        want = None
    try:
        got: tuple[str, str] | None = split_path(arg)
    except AddressError:
        got = None
    assert got == want
