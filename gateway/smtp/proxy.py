"""PROXY protocol v1 (text) and v2 (binary) headers, as HAProxy specifies them.

Only the source address matters to us: it replaces the socket peer for every
later check, log line and XCLIENT. The caller decides whether the peer may
send a header at all (trusted proxy networks); this module only parses.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from gateway.stream import Stream
from gateway.wire import number

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107


class ProxyError(ValueError):
    """The header is malformed; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    version: int
    src_addr: str | None  # None for LOCAL / UNKNOWN: keep the socket peer
    src_port: int | None
    dst_addr: str | None = None
    dst_port: int | None = None


async def read_header(stream: Stream) -> ProxyInfo:
    head = await stream.peek(12)
    if head == V2_SIGNATURE:
        return await _read_v2(stream)
    if head.startswith(b"PROXY "):
        return await _read_v1(stream)
    raise ProxyError("no PROXY header")


async def _read_v1(stream: Stream) -> ProxyInfo:
    try:
        line = await stream.readline(V1_MAX - 2)
    except ValueError as e:
        raise ProxyError("PROXY v1 line too long") from e
    parts = line.decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyInfo(1, None, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed PROXY v1 header")
    try:
        # No IPv6 zone ("fe80::1%eth0"): it names an interface of the proxy, and
        # would reach logs, rate-limit keys and XCLIENT as part of the address.
        if "%" in parts[2] or "%" in parts[3]:
            raise ValueError("zone")
        src = ipaddress.ip_address(parts[2])
        dst = ipaddress.ip_address(parts[3])
    except ValueError as e:
        raise ProxyError("malformed PROXY v1 address") from e
    sport, dport = _port(parts[4]), _port(parts[5])
    want = 4 if parts[1] == "TCP4" else 6
    if src.version != want or dst.version != want or sport is None or dport is None:
        raise ProxyError("malformed PROXY v1 address")
    _peer(src, sport)
    return ProxyInfo(1, str(src), sport, str(dst), dport)


_MAPPED_OLD = ipaddress.IPv6Network("::/96")  # IPv4-compatible (RFC 4291 2.5.5.1, deprecated)


def _peer(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    """A source a TCP client can have: unicast, a port other than 0. Anything else
    is a proxy's bug or a forgery, and would reach logs, Received and XCLIENT."""
    bad = (
        addr.is_unspecified
        or addr.is_multicast
        or port == 0
        or (addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"))
        or (addr.version == 6 and addr in _MAPPED_OLD and addr != ipaddress.IPv6Address("::1"))
    )
    if bad:
        raise ProxyError(f"PROXY source {addr} port {port} is no TCP client")


def _port(text: str) -> int | None:
    """A port as HAProxy writes it: 0 to 65535 in ASCII digits, no sign, no leading
    zero (int() would also take "+25", "2_5" and other scripts' digits)."""
    n = number(text, 5)
    if n is None or n > 65535 or (len(text) > 1 and text[0] == "0"):
        return None
    return n


async def _read_v2(stream: Stream) -> ProxyInfo:
    head = await stream.read_exactly(16)
    ver_cmd, fam, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError("bad PROXY v2 version")
    if length > 1024:
        raise ProxyError("PROXY v2 header too long")
    body = await stream.read_exactly(length)
    cmd = ver_cmd & 0x0F
    if cmd == 0x0:  # LOCAL: health check from the proxy itself
        return ProxyInfo(2, None, None)
    if cmd != 0x1:
        raise ProxyError("bad PROXY v2 command")
    family, transport = fam >> 4, fam & 0x0F
    if family in (0x1, 0x2) and transport != 0x1:  # only STREAM: SMTP runs over TCP
        raise ProxyError("PROXY v2 transport is not STREAM")
    if family == 0x1 and len(body) >= 12:
        src4 = ipaddress.IPv4Address(body[0:4])
        dst4 = ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        _peer(src4, sport)
        return ProxyInfo(2, str(src4), sport, str(dst4), dport)
    if family == 0x2 and len(body) >= 36:
        src6 = ipaddress.IPv6Address(body[0:16])
        dst6 = ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
        _peer(src6, sport)
        return ProxyInfo(2, str(src6), sport, str(dst6), dport)
    if family == 0x0:
        return ProxyInfo(2, None, None)
    raise ProxyError("unsupported PROXY v2 address family")
