"""Which checks exist and which symbols they can emit (the policy is validated against these)."""

from __future__ import annotations

from gateway import config
from gateway.checks.base import Check
from gateway.checks.relay import RelayCheck
from gateway.pipeline.policy import generic_symbols


def build_checks(settings: config.Settings) -> list[Check]:
    return [RelayCheck(settings.local_domains)]


def known_symbols(checks: list[Check]) -> set[str]:
    out: set[str] = set()
    for c in checks:
        out |= set(c.symbols) | generic_symbols(c.name)
    return out


def all_known_symbols(settings: config.Settings) -> set[str]:
    return known_symbols(build_checks(settings))
