"""The From domains DMARC judges: bounded work on any value a client writes."""

from __future__ import annotations

import pytest

from gateway.addrlist import MAX_COMMENTS
from gateway.checks.dmarc import MAX_FROM_VALUE, from_domains, value_domains


@pytest.mark.parametrize(
    ("value", "domains"),
    [
        ("a@Example.ORG", ["example.org"]),
        ("Joe <joe@example.org>", ["example.org"]),
        ('"Doe, J" <j@a.test>, b@b.test', ["a.test", "b.test"]),
        ("a@b.test " + "(c)" * MAX_COMMENTS, ["b.test"]),
    ],
)
def test_from_values(value: str, domains: list[str]) -> None:
    assert value_domains(value) == domains


@pytest.mark.parametrize(
    "value",
    [
        "a@b.test " + "(c)" * (MAX_COMMENTS + 1),  # the parser is slow in comments
        "a@b.test " + "(" * 5000 + ")" * 5000,  # it recursed once per level: RecursionError
        '"x" <a@b.test>, ' + "c@d.test, " * (MAX_FROM_VALUE // 10),
        "a@" + "@" * MAX_FROM_VALUE,
    ],
)
def test_a_from_past_the_bounds_is_malformed(value: str) -> None:
    assert value_domains(value) == []
    assert from_domains(b"From: " + value.encode() + b"\r\n\r\nbody\r\n") == []
