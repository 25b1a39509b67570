"""Where a domain's reports may go: its rua= URIs read within bounds, and the
authorisation of a destination outside the domain (RFC 7489 7.1).

rua is written by whoever controls the sender's domain, an attacker's as easily
as anyone's: only mailto: URIs are used, at most `max_uris` of them (RFC 7489 6.2
asks a receiver to support two), each an address that parses as an envelope path
would, with its size limit ("!10m") read as a number of bounded digits. A
destination whose organisational domain is not the policy domain's receives
reports only if it says it wants them: a TXT record starting "v=DMARC1" at
<policy-domain>._report._dmarc.<destination-domain> (a wildcard there is the DNS's
business: one query covers it). Without that check a record could make the
gateway mail any mailbox in the world, every day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from gateway.address import AddressError, parse_path
from gateway.checks.dmarc import psl
from gateway.dns import Resolver

# Entries of rua looked at (valid or not); the rest is never read.
MAX_ENTRIES = 32
_SIZE = re.compile(r"!(\d{1,15})([kmgt]?)\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True, slots=True)
class Destination:
    address: str  # local@domain, ASCII
    domain: str
    limit: int | None = None  # bytes, from a "!" suffix


def destinations(rua: str, max_uris: int) -> list[Destination]:
    """The mailto: destinations of `rua`, in order, without repeats, at most
    `max_uris`. Other schemes and addresses that do not parse are skipped."""
    out: list[Destination] = []
    for entry in rua.split(",")[:MAX_ENTRIES]:
        entry = entry.strip()
        if entry[:7].lower() != "mailto:":
            continue
        uri = entry[7:]
        limit = None
        m = _SIZE.search(uri)
        if m is not None:
            limit = int(m[1]) * _UNITS[m[2].lower()]
            uri = uri[: m.start()]
        # A mailto: URI may carry ?headers; only the address is used. Commas and
        # "!" in it are percent-encoded (RFC 7489 6.4).
        address = unquote(uri.split("?", 1)[0], errors="strict" if uri.isascii() else "replace")
        dest = _destination(address, limit)
        if dest is not None and all(d.address != dest.address for d in out):
            out.append(dest)
            if len(out) >= max_uris:
                break
    return out


def _destination(address: str, limit: int | None) -> Destination | None:
    if not address.isascii() or not address.isprintable() or len(address) > 254:
        return None
    try:
        parsed = parse_path(f"<{address}>")
    except (AddressError, UnicodeError):
        return None
    domain = parsed.domain
    if parsed.is_null or not parsed.local or parsed.literal or parsed.route or "." not in domain:
        return None
    return Destination(str(parsed), domain, limit)


def org_domain(domain: str) -> str:
    """The organisational domain by the Public Suffix List (offline, as the DMARC
    check's `psl` method): what decides whether a destination is "outside"."""
    return psl().privatesuffix(domain) or domain


Verdict = Literal["ok", "unauthorized", "temperror"]


class Authorizer:
    """Decides, once per (policy domain, destination domain) and run, whether
    reports may go there."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.seen: dict[tuple[str, str], Verdict] = {}

    async def check(self, policy_domain: str, dest: Destination) -> Verdict:
        if org_domain(dest.domain) == org_domain(policy_domain):
            return "ok"
        key = (policy_domain, dest.domain)
        found = self.seen.get(key)
        if found is None:
            found = self.seen[key] = await self._ask(policy_domain, dest.domain)
        return found

    async def _ask(self, policy_domain: str, dest_domain: str) -> Verdict:
        ans = await self.resolver.query(f"{policy_domain}._report._dmarc.{dest_domain}", "TXT")
        if ans.temporary:
            return "temperror"
        for strings in ans.records:
            text = b"".join(strings).decode("utf-8", "replace")
            if text.replace(" ", "").lower().startswith("v=dmarc1"):
                return "ok"
        return "unauthorized"
