"""Listener TLS (gateway/smtp/tls.py): contexts from the config, certificates by SNI and
their reload, and handshake failures named by what really happened (memory BIOs:
no socket)."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

from gateway.smtp import tls
from tests.support.certs import make_cert


def _handshake_failure(tmp_path: Path, first_bytes: bytes, minimum: str = "TLSv1.2") -> str:
    """What a server-side OpenSSL handshake makes of a client's first bytes, named
    as the metric names it (memory BIOs: no socket)."""
    cert, key = make_cert(tmp_path, "gw.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.VERSIONS[minimum]
    ctx.load_cert_chain(cert, key)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(first_bytes)
    try:
        obj.do_handshake()
    except ssl.SSLError as e:
        return tls.failure_reason(e)
    raise AssertionError("the handshake did not fail")


def test_plaintext_on_an_implicit_tls_port_is_not_tls(tmp_path: Path) -> None:
    assert _handshake_failure(tmp_path, b"EHLO client.example\r\n") == "not_tls"
    assert _handshake_failure(tmp_path, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == "not_tls"


def test_an_old_protocol_version_is_protocol_version(tmp_path: Path) -> None:
    """A TLS 1.2 ClientHello at a listener whose minimum is TLS 1.3."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(cin, cout)
    with contextlib.suppress(ssl.SSLWantReadError):
        c.do_handshake()
    assert _handshake_failure(tmp_path, cout.read(), "TLSv1.3") == "protocol_version"
