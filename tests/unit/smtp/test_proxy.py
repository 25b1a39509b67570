"""The PROXY protocol header (gateway/smtp/proxy.py), v1 and v2, read from a stream
fed directly (no sockets)."""

from __future__ import annotations

import pytest

from gateway.smtp.proxy import V2_SIGNATURE, ProxyError, read_header
from gateway.stream import StreamClosed
from tests.unit.fakes import fed, run


def test_proxy_v1_and_errors() -> None:
    info = run(read_header(fed(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n")))
    assert (info.src_addr, info.src_port) == ("2001:db8::1", 1)
    assert run(read_header(fed(b"PROXY UNKNOWN\r\n"))).src_addr is None
    for bad in (
        b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n",
        b"HELO x\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 99999\r\n",
    ):
        with pytest.raises((ProxyError, StreamClosed)):
            run(read_header(fed(bad)))


@pytest.mark.parametrize(
    "bad",
    [
        "PROXY TCP4 192.0.2.1 192.0.2.2 +25 25\r\n",  # int() takes a sign,
        "PROXY TCP4 192.0.2.1 192.0.2.2 2_5 25\r\n",  # an underscore,
        "PROXY TCP4 192.0.2.1 192.0.2.2 \u0662\u0665 25\r\n",  # other digits
        "PROXY TCP4 192.0.2.1 192.0.2.2 025 25\r\n",  # leading zero (HAProxy writes none)
        "PROXY TCP6 fe80::1%eth0 2001:db8::2 1 25\r\n",  # a zone: no address to log or pass on
        "PROXY TCP6 2001:db8::1 fe80::2%1 1 25\r\n",
        "PROXY TCP4 0.0.0.0 192.0.2.2 1 25\r\n",  # no TCP client has these sources
        "PROXY TCP4 255.255.255.255 192.0.2.2 1 25\r\n",
        "PROXY TCP4 224.0.0.1 192.0.2.2 1 25\r\n",
        "PROXY TCP6 :: 2001:db8::2 1 25\r\n",
        "PROXY TCP6 ::1.2.3.4 2001:db8::2 1 25\r\n",  # IPv4-compatible (deprecated)
        "PROXY TCP4 192.0.2.1 192.0.2.2 0 25\r\n",  # port 0
    ],
)
def test_proxy_v1_numbers_and_addresses_are_exactly_what_haproxy_writes(bad: str) -> None:
    with pytest.raises(ProxyError):
        run(read_header(fed(bad.encode())))


def _v2(fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("fam", "body"),
    [
        (0x12, bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 25])),  # DGRAM
        (0x1F, bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 25])),  # an undefined transport
        (0x11, bytes([0, 0, 0, 0, 192, 0, 2, 2, 0, 1, 0, 25])),  # 0.0.0.0
        (0x11, bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 0, 0, 25])),  # port 0
    ],
)
def test_proxy_v2_takes_stream_sources_of_tcp_clients_only(fam: int, body: bytes) -> None:
    with pytest.raises(ProxyError):
        run(read_header(fed(_v2(fam, body))))


def test_proxy_v2_stream() -> None:
    info = run(read_header(fed(_v2(0x11, bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 25])))))
    assert (info.src_addr, info.src_port) == ("192.0.2.1", 1)
