"""The From domains DMARC judges: bounded work on any value a client writes; and
what an evaluation tells the aggregate reports."""

from __future__ import annotations

import asyncio

import pytest

from gateway.addrlist import MAX_COMMENTS
from gateway.checks.dmarc import (
    MAX_FROM_VALUE,
    DmarcCheck,
    from_domains,
    parse_record,
    value_domains,
)
from gateway.facts import PublishedPolicy
from tests.unit.fakes import DictResolver, txt


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


# -- what an aggregate report needs of an evaluation -------------------------------------


def test_the_record_as_a_report_publishes_it() -> None:
    rec = parse_record("a.test", "v=DMARC1; p=reject; aspf=s; pct=50; fo=1:d; rua=mailto:r@a.test")
    assert rec is not None
    assert rec.published == PublishedPolicy(
        "a.test", "reject", "reject", "r", "s", 50, "1:d", "mailto:r@a.test"
    )
    odd = parse_record("b.test", "v=DMARC1; p=none; sp=quarantine; fo=<x>; rua=" + "m" * 5000)
    assert odd is not None and odd.published is not None
    assert (odd.published.sp, odd.published.fo, len(odd.published.rua)) == ("quarantine", "0", 2048)


def evaluate(record: str, spf: str | None, dkim: list[str], rand: float = 0.5):  # type: ignore[no-untyped-def]
    check = DmarcCheck(DictResolver({("_dmarc.a.test", "TXT"): txt(record)}))
    check.rand = lambda: rand
    return asyncio.run(check.evaluate("a.test", spf, dkim))


def test_the_outcome_says_which_identifiers_aligned() -> None:
    out = evaluate("v=DMARC1; p=reject; rua=mailto:r@a.test", "a.test", ["x.test", "a.test"])
    assert (out.result, out.spf_aligned, out.dkim_aligned) == ("pass", True, True)
    assert out.published is not None and out.published.rua == "mailto:r@a.test"
    out = evaluate("v=DMARC1; p=reject", None, ["a.test"])
    assert (out.spf_aligned, out.dkim_aligned) == (False, True)


def test_the_outcome_says_why_the_disposition_is_weaker_than_the_policy() -> None:
    assert evaluate("v=DMARC1; p=reject", None, []).overrides == ()
    sampled = evaluate("v=DMARC1; p=reject; pct=10", None, [], rand=0.5)
    assert (sampled.disposition, sampled.overrides) == ("quarantine", ("sampled_out",))
    testing = evaluate("v=DMARC1; p=reject; t=y", None, [])
    assert (testing.disposition, testing.overrides) == ("quarantine", ("testing",))
    none = evaluate("v=DMARC1; p=none; t=y", None, [])  # nothing to weaken: no reason
    assert (none.disposition, none.overrides) == ("none", ())
