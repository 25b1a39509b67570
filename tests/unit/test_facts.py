"""What the authentication checks find, typed (gateway/facts.py): a signature's
Authentication-Results entry, and facts that are new with each transaction."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.facts import ArcFacts, DkimSignature, Facts, SpfFacts
from gateway.vocab import AuthResult


def test_a_signature_reports_its_domain_selector_algorithm_and_short_b() -> None:
    sig = DkimSignature("example.test", "s1", "rsa-sha256", "pass", b="abcdefghijkl")
    assert sig.auth_result() == AuthResult(
        "dkim",
        "pass",
        {
            "header.d": "example.test",
            "header.s": "s1",
            "header.a": "rsa-sha256",
            "header.b": "abcdefgh",  # RFC 6008: enough of b= to tell signatures apart
        },
        "",
    )


def test_a_signature_without_b_has_no_header_b_and_its_length_is_in_the_reason() -> None:
    bare = DkimSignature("example.test", "s1", "ed25519-sha256", "fail", "bad", body_length=42)
    res = bare.auth_result()
    assert "header.b" not in res.props
    assert res.reason == "bad; l=42"
    assert DkimSignature("d.test", "s", "a-b", "pass", body_length=0).auth_result().reason == "l=0"


def test_facts_start_empty_and_are_never_shared_between_transactions() -> None:
    one, two = Facts(), Facts()
    assert (one.spf, one.dkim, one.arc, one.dmarc, one.incomplete) == (
        None,
        (),
        None,
        None,
        frozenset(),
    )
    one.spf = SpfFacts("a.test", "pass")
    assert two.spf is None


def test_findings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ArcFacts("pass").result = "fail"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SpfFacts("a.test", "pass").result = "fail"  # type: ignore[misc]
