"""Where TLS is required by policy: chosen senders, client networks, recipients.

A public MX must stay opportunistic (RFC 3207 4), so the listener alone cannot
demand TLS from everyone; these rules demand it from those who should have
it: a partner's domain (`require_tls_from`), a network (`require_tls_networks`),
or mail for a local domain whose owner requires it (`require_tls_to`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Self

from pydantic import Field

from gateway.checks.relay import DomainMatcher
from gateway.config import Networks, Strict
from gateway.context import Context
from gateway.net import network_matcher
from gateway.vocab import Stage

REQUIRED = "tls.required"


class TlsPolicyOptions(Strict):
    enabled: bool = True
    require_tls_from: list[str] = Field(default_factory=list)  # sender domains, *.wildcards
    require_tls_networks: Networks = Field(default_factory=list)  # client networks
    require_tls_to: list[str] = Field(default_factory=list)  # local recipient domains


class TlsPolicyCheck:
    name: ClassVar[str] = "tls"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL, Stage.RCPT})
    symbols: ClassVar[frozenset[str]] = frozenset({REQUIRED})
    reputation: ClassVar[bool] = False  # trusted networks too: it is their rule
    requires: ClassVar[frozenset[str]] = frozenset()
    budget: float | None = None

    def __init__(self) -> None:
        self.from_domains = DomainMatcher([])
        self.to_domains = DomainMatcher([])
        self.in_networks: Callable[[str], bool] = network_matcher([])
        self.has_networks = False

    def configured(self, options: TlsPolicyOptions) -> Self:
        """This check under `options`: a new object."""
        new = type(self)()
        new.from_domains = DomainMatcher([d.lower() for d in options.require_tls_from])
        new.to_domains = DomainMatcher([d.lower() for d in options.require_tls_to])
        new.in_networks = network_matcher(options.require_tls_networks)
        new.has_networks = bool(options.require_tls_networks)
        return new

    def active_stages(self) -> set[Stage]:
        out = set()
        if self.from_domains or self.has_networks:
            out.add(Stage.MAIL)
        if self.to_domains:
            out.add(Stage.RCPT)
        return out

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...]:
        if ctx.tls_version is not None:
            return ()
        why = None
        if stage is Stage.MAIL:
            if self.in_networks(ctx.client_ip):
                why = "your network"
            elif ctx.mail_from is not None and ctx.mail_from.domain in self.from_domains:
                why = ctx.mail_from.domain
        elif ctx.rcpt is not None and ctx.rcpt.domain in self.to_domains:
            why = ctx.rcpt.domain
        if why is None:
            return ()
        ctx.details[REQUIRED] = why
        return (REQUIRED,)
