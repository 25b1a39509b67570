"""Which checks exist and which symbols they can emit (the policy is validated against these)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import config
from gateway.checks.arc import ArcCheck
from gateway.checks.base import Check, generic_symbols
from gateway.checks.dkim import DkimCheck
from gateway.checks.dmarc import DmarcCheck
from gateway.checks.dnsbl import DnsblCheck
from gateway.checks.ratelimit import RateLimitCheck
from gateway.checks.relay import RelayCheck
from gateway.checks.spf import SpfCheck
from gateway.checks.tlspolicy import TlsPolicyCheck
from gateway.dns import Resolver

if TYPE_CHECKING:
    from gateway.store import Store

# Every check class, in the order they run within a stage.
# DMARC reads what SPF (at MAIL), DKIM and ARC (earlier at DATA) found.
CHECK_CLASSES: tuple[Any, ...] = (
    DnsblCheck,
    RelayCheck,
    TlsPolicyCheck,
    RateLimitCheck,
    SpfCheck,
    DkimCheck,
    ArcCheck,
    DmarcCheck,
)


def build_checks(settings: config.Settings, resolver: Resolver, store: Store) -> list[Check]:
    return [
        DnsblCheck(resolver),
        RelayCheck(settings.local_domains),
        TlsPolicyCheck(),
        RateLimitCheck(store),
        SpfCheck(resolver),
        DkimCheck(resolver),
        ArcCheck(resolver),
        DmarcCheck(resolver),
    ]


def all_known_symbols() -> set[str]:
    out: set[str] = set()
    for cls in CHECK_CLASSES:
        out |= set(cls.symbols) | generic_symbols(cls.name)
    return out
