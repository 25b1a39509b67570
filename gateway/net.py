"""Client addresses and networks: one spelling per client, the networks it is in,
and what groups addresses that one sender controls together."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)  # a client comes back; parsing is the dear part
def network_of(ip: str, v4: int = 24, v6: int = 64) -> str:
    """The /24 (IPv4) or /64 (IPv6) `ip` is in: senders send from pools, and one
    party usually holds at least that much."""
    addr = ipaddress.ip_address(ip)
    prefix = v4 if addr.version == 4 else v6
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def plain_ip(ip: str) -> str:
    """An IPv4-mapped IPv6 address (what a dual-stack `::` listener sees for an IPv4
    client) as the IPv4 address it is, so that logs, headers, XCLIENT, rate-limit
    keys and checks all name one client one way; anything else unchanged."""
    if ":" not in ip:  # IPv4 (or not an address at all): nothing to parse
        return ip
    try:
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
    except ValueError:
        return ip
    return ip if mapped is None else str(mapped)


def network_matcher(nets: list[IPNetwork]) -> Callable[[str], bool]:
    """The one test of "is this client in these networks" (IPv4-mapped IPv6 counts as
    IPv4), cached per address: trusted, proxy, allow and exempt lists all use it."""

    @functools.lru_cache(maxsize=4096)
    def match(ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(plain_ip(ip))
        except ValueError:
            return False
        return any(addr in n for n in nets)

    return match
