"""Relay control: only recipients in our local domains, and no routing tricks.

An inbound gateway must never become a path to the outside. Besides plain
foreign domains, classic tricks make a local-looking address route elsewhere
at the backend: the percent hack (`user%remote@local`), bang paths
(`remote!user@local`), a quoted `@` (`"user@remote"@local`), source routes
(`@local:user@remote`) and address literals. All are refused as non-local.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.address import Address
from gateway.context import Context
from gateway.dns import ascii_name
from gateway.vocab import Stage

DENIED = "relay.denied"


class DomainMatcher:
    """Exact names and `*.example.org` wildcards (which match subdomains only).

    An internationalised domain has two spellings, U-labels (SMTPUTF8 mail) and
    A-labels (all other mail), and both name it: names are compared as A-labels."""

    __slots__ = ("_exact", "_suffixes")

    def __init__(self, domains: list[str]) -> None:
        domains = [ascii_name(d) for d in domains]
        self._exact = frozenset(d for d in domains if not d.startswith("*."))
        self._suffixes = tuple(d[1:] for d in domains if d.startswith("*."))

    def __bool__(self) -> bool:
        return bool(self._exact or self._suffixes)

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str):
            return False
        if not domain.isascii():
            # A trailing dot is part of what the backend receives: "bücher.example." is
            # no more ours than "xn--bcher-kva.example." is (ascii_name drops it).
            dot = "." if domain.endswith(".") else ""
            domain = ascii_name(domain) + dot
        return domain in self._exact or (bool(self._suffixes) and domain.endswith(self._suffixes))


def relay_trick(addr: Address) -> bool:
    if addr.route or addr.literal:
        return True
    local = addr.local
    return "@" in local or "%" in local or "!" in local


class RelayCheck:
    name: ClassVar[str] = "relay"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.RCPT})
    symbols: ClassVar[frozenset[str]] = frozenset({DENIED})
    reputation: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset()
    budget: float | None = None

    def __init__(self, local_domains: list[str]) -> None:
        self.local = DomainMatcher(local_domains)

    def is_local(self, addr: Address) -> bool:
        # RFC 5321 4.5.1: RCPT TO:<Postmaster>, without a domain, MUST be accepted; the
        # command parser gives that path (and only that one) an empty domain.
        local = addr.domain in self.local or (not addr.domain and addr.local == "postmaster")
        return local and not relay_trick(addr)

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...]:
        rcpt = ctx.rcpt
        if rcpt is None or self.is_local(rcpt):
            return ()
        return (DENIED,)
