"""Which checks exist and which symbols they can emit (the policy is validated against these)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import config
from gateway.checks.arc import ArcCheck
from gateway.checks.base import Check, generic_symbols
from gateway.checks.clamav import ClamavCheck
from gateway.checks.dkim import DkimCheck
from gateway.checks.dmarc import DmarcCheck
from gateway.checks.dnsbl import DnsblCheck
from gateway.checks.greylist import GreylistCheck
from gateway.checks.ratelimit import RateLimitCheck
from gateway.checks.relay import RelayCheck
from gateway.checks.rspamd import RspamdCheck
from gateway.checks.spf import SpfCheck
from gateway.checks.tlspolicy import TlsPolicyCheck
from gateway.dns import Resolver
from gateway.store import greylist_for

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
    # Content scanners last: a message refused by the checks above is not sent.
    # Rspamd before clamd: most refused mail is spam, and a message Rspamd rejects
    # is spared the slower virus scan.
    RspamdCheck,
    # Greylisting: at RCPT after relay control and the limits (a refused recipient
    # is no triplet); at DATA after Rspamd, whose verdict it may defer to.
    GreylistCheck,
    ClamavCheck,
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
        RspamdCheck(),
        GreylistCheck(greylist_for(store)),
        ClamavCheck(),
    ]


def all_known_symbols() -> set[str]:
    out: set[str] = set()
    for cls in CHECK_CLASSES:
        out |= set(cls.symbols) | generic_symbols(cls.name)
    return out
