"""Client networks: what groups addresses that one sender controls together."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)  # a client comes back; parsing is the dear part
def network_of(ip: str, v4: int = 24, v6: int = 64) -> str:
    """The /24 (IPv4) or /64 (IPv6) `ip` is in: senders send from pools, and one
    party usually holds at least that much."""
    addr = ipaddress.ip_address(ip)
    prefix = v4 if addr.version == 4 else v6
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
