"""The `rewrite:` section of the policy (gateway/rewrite/options.py): what it refuses
to load, so that a mistake is found at load and not on a live message."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.rewrite.options import RewriteOptions


def load(data: dict[str, Any]) -> RewriteOptions:
    return RewriteOptions.model_validate(data)


def test_the_defaults_rewrite_nothing() -> None:
    opts = load({})
    assert not opts.srs.enabled and opts.virtual_alias.rules == {}
    assert (opts.subaddress_delimiter, opts.subaddress) == ("+", "keep")
    assert opts.original_recipient_header is None


@pytest.mark.parametrize(
    ("srs", "problem"),
    [
        ({"enabled": True, "secrets": ["k"]}, "srs.enabled needs srs.domain"),
        ({"enabled": True, "domain": "srs.example.org"}, "needs secrets or secrets_file"),
    ],
)
def test_srs_enabled_needs_a_domain_and_a_secret(srs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        load({"srs": srs})
    load({"srs": {**srs, "enabled": False}})  # off, nothing is needed


@pytest.mark.parametrize(
    "data",
    [
        {"virtual_alias": {"max_depth": 51}},
        {"virtual_alias": {"max_depth": 0}},
        {"virtual_alias": {"max_expansion": 1001}},
        {"srs": {"hash_length": 7}},  # 35 bits: guessable
        {"srs": {"max_age_days": 0}},
        {"subaddress": "drop"},
        {"original_recipient_header": "X-Original-To:"},  # a colon ends a field name
        {"original_recipient_header": "X Original"},
        {"original_recipient_header": "X-\u00c4"},
        {"original_recipient_header": "X" * 77},
        {"masquerade": {"domain": ["example.org"]}},  # a typo: unknown keys are refused
    ],
)
def test_values_out_of_bounds_and_unknown_keys_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        load(data)


def test_a_field_name_of_printable_ascii_is_taken() -> None:
    assert load({"original_recipient_header": "X-Original-To"}).original_recipient_header == (
        "X-Original-To"
    )
