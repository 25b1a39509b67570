"""TLS policy, certificates (SNI, reload), client certificates and REQUIRETLS, with real
handshakes on loopback and certificates generated here."""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support.certs import make_cert
from tests.support.procs import Backend, Gateway, base_config

MSG = b"Subject: t\r\n\r\nhello\r\n"


def tls_listener(cfg: dict[str, Any], cert: Path, key: Path, **extra: Any) -> dict[str, Any]:
    cfg["listeners"][0].update(tls="starttls", cert_file=str(cert), key_file=str(key), **extra)
    return cfg


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_cert(
    port: int, server_name: str | None, ctx: ssl.SSLContext | None = None
) -> x509.Certificate:
    """The certificate the gateway presents after STARTTLS for this SNI name."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220")
        raw.sendall(b"EHLO c.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        with (ctx or no_verify()).wrap_socket(raw, server_hostname=server_name) as t:
            der = t.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)


def common_name(c: x509.Certificate) -> str:
    return str(c.subject.rfc4514_string())


def test_old_protocol_is_refused_and_counted(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path)
    gw = gateway_factory(tls_listener(base_config(backend.url), cert, key))
    old = no_verify()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point of this client
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        peer_cert(gw.port(), "gw.test", old)
    ev = gw.wait_log(lambda e: e.get("event") == "tls_failed")
    assert ev["reason"] == "protocol_version"
    failures = 'smtp_gateway_tls_handshake_failures_total{listener="smtp",'
    assert gw.metric(failures + 'reason="protocol_version"}') == 1
    # TLS 1.2 is the default minimum and works; the session is counted by version.
    v12 = no_verify()
    v12.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.starttls(context=v12)
        s.ehlo("c.test")
        assert s.docmd("STARTTLS")[0] == 503  # a second STARTTLS is refused
        assert s.sendmail("a@sender.test", ["x@example.test"], MSG) == {}
    gw.wait_log(
        lambda e: e.get("event") == "disconnect" and "transactions" in e and e["transactions"] == 1
    )
    assert gw.metric('smtp_gateway_tls_sessions_total{listener="smtp",version="TLSv1.2"}') == 1
    ev = gw.wait_log(lambda e: e.get("event") == "transaction")
    assert ev["tls"] == "TLSv1.2" and ev["tls_cipher"]
    [m] = backend.messages()
    assert b"with ESMTPS" in m["data"] and b"(version=TLS1_2 cipher=" in m["data"]


def test_minimum_tls13_listener_refuses_tls12(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path)
    gw = gateway_factory(
        tls_listener(base_config(backend.url), cert, key, min_tls_version="TLSv1.3")
    )
    v12 = no_verify()
    v12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        peer_cert(gw.port(), "gw.test", v12)
    assert peer_cert(gw.port(), "gw.test") is not None  # 1.3 works


def test_sni_picks_the_certificate(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path / "default", "gw.test")
    partner, pkey = make_cert(tmp_path / "partner", "mx.partner.test")
    wild, wkey = make_cert(tmp_path / "wild", "*.wild.test")
    cfg = tls_listener(
        base_config(backend.url),
        cert,
        key,
        certificates=[
            {"cert_file": str(partner), "key_file": str(pkey)},
            {"cert_file": str(wild), "key_file": str(wkey)},
        ],
    )
    gw = gateway_factory(cfg)
    assert common_name(peer_cert(gw.port(), "mx.partner.test")) == "CN=mx.partner.test"
    assert common_name(peer_cert(gw.port(), "MX.Partner.Test")) == "CN=mx.partner.test"
    assert common_name(peer_cert(gw.port(), "a.wild.test")) == "CN=*.wild.test"
    assert common_name(peer_cert(gw.port(), "other.test")) == "CN=gw.test"
    assert common_name(peer_cert(gw.port(), None)) == "CN=gw.test"  # no SNI: the default


def test_policy_requires_tls_from_senders_networks_and_for_recipients(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path)
    policy = (
        "checks:\n  tls:\n    require_tls_from: [secure.test]\n"
        "    require_tls_to: [vault.example.test]\n"
    )
    cfg = tls_listener(
        base_config(backend.url, local_domains=["example.test", "vault.example.test"]), cert, key
    )
    gw = gateway_factory(cfg, policy=policy)
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("c.test")
        code, msg = s.mail("boss@secure.test")
        assert (code, msg[:6]) == (530, b"5.7.10") and b"secure.test" in msg
        assert s.mail("someone@other.test")[0] == 250  # other senders pass
        code, msg = s.rcpt("x@vault.example.test")
        assert (code, msg[:6]) == (530, b"5.7.10")
        assert s.rcpt("x@example.test")[0] == 250
        s.rset()
        s.starttls(context=no_verify())
        s.ehlo("c.test")
        assert s.mail("boss@secure.test")[0] == 250
        assert s.rcpt("x@vault.example.test")[0] == 250
        assert s.data(MSG)[0] == 250
    assert gw.metric('smtp_gateway_check_results_total{check="tls",symbol="tls.required"}') == 2
    # Networks: every plaintext MAIL from a listed network is refused.
    gw2 = gateway_factory(
        tls_listener(base_config(backend.url), cert, key),
        policy="checks:\n  tls:\n    require_tls_networks: [127.0.0.0/8]\n",
    )
    with smtplib.SMTP("127.0.0.1", gw2.port()) as s:
        s.ehlo("c.test")
        code, msg = s.mail("a@any.test")
        assert code == 530 and b"your network" in msg


def _swap(link_dir: Path, target: Path) -> None:
    """Kubernetes' Secret update: point ..data at a new directory in one rename."""
    tmp = link_dir / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, link_dir / "..data")


def test_certificate_files_reload_under_a_running_gateway(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    vol = tmp_path / "secret"
    v1 = vol / "v1"
    c1, k1 = make_cert(v1, "gw.test", days=30)
    for name, src in (("tls.crt", c1.name), ("tls.key", k1.name)):
        (vol / name).symlink_to(f"..data/{src}")
    _swap(vol, v1)
    cfg = tls_listener(base_config(backend.url), vol / "tls.crt", vol / "tls.key")
    cfg["tls_reload_interval"] = 0.2
    gw = gateway_factory(cfg)
    first = peer_cert(gw.port(), "gw.test")
    expiry = (
        "smtp_gateway_tls_certificate_expiry_timestamp_seconds"
        '{certificate="default",listener="smtp"}'
    )
    assert gw.metric(expiry) == first.not_valid_after_utc.timestamp()
    # An established session, opened before the swap.
    held = smtplib.SMTP("127.0.0.1", gw.port())
    held.starttls(context=no_verify())
    held.ehlo("c.test")
    # The new pair, same file names, different certificate (Secret symlink swap).
    v2 = vol / "v2"
    c2, _ = make_cert(v2, "gw.test", days=90)
    _swap(vol, v2)
    gw.wait_log(lambda e: e.get("event") == "tls_reloaded")
    second = peer_cert(gw.port(), "gw.test")
    assert second.serial_number != first.serial_number
    assert second.serial_number == x509.load_pem_x509_certificate(c2.read_bytes()).serial_number
    assert gw.metric(expiry) == second.not_valid_after_utc.timestamp()
    assert held.sendmail("a@sender.test", ["x@example.test"], MSG) == {}  # still working
    held.quit()
    # A broken replacement: logged, the working one kept.
    v3 = vol / "v3"
    v3.mkdir()
    (v3 / c1.name).write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    (v3 / k1.name).write_bytes(k1.read_bytes())
    _swap(vol, v3)
    ev = gw.wait_log(lambda e: e.get("event") == "tls_reload_failed")
    # Named as config check names it: the key, the file, what is wrong with it.
    assert ev["error"] == f"listeners.0.cert_file: {vol / 'tls.crt'}: no PEM certificate in it"
    assert ev["level"] == "warning"
    assert peer_cert(gw.port(), "gw.test").serial_number == second.serial_number
    reloads = 'smtp_gateway_tls_certificate_reloads_total{listener="smtp",result='
    assert gw.metric(reloads + '"failed"}') == 1
    assert gw.metric(reloads + '"ok"}') == 1


def test_client_certificate_required_on_a_partner_listener(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path / "server", "gw.test")
    client_cert, client_key = make_cert(tmp_path / "client", "partner.test")
    gw = gateway_factory(
        tls_listener(
            base_config(backend.url),
            cert,
            key,
            client_certificate="required",
            client_ca_file=str(client_cert),
        )
    )
    # Without a certificate: refused (with TLS 1.3 the client learns it at its first
    # read after the handshake), logged and counted as a certificate failure.
    with (
        pytest.raises((ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected)),
        smtplib.SMTP("127.0.0.1", gw.port()) as s,
    ):
        s.starttls(context=no_verify())
        s.ehlo("c.test")
    ev = gw.wait_log(lambda e: e.get("event") == "tls_failed")
    assert ev["reason"] == "certificate"
    with_cert = no_verify()
    with_cert.load_cert_chain(client_cert, client_key)
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.starttls(context=with_cert)
        s.ehlo("c.test")
        assert s.sendmail("a@partner.test", ["x@example.test"], MSG) == {}


def _verified_backend_pair(
    tmp_path: Path,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
    *backend_args: str,
) -> tuple[Backend, Gateway]:
    """A TLS backend, and a STARTTLS gateway whose hop to it is verified TLS."""
    bcert, bkey = make_cert(tmp_path / "backend", "backend.test")
    be = backend_factory("--tls-cert", str(bcert), "--tls-key", str(bkey), *backend_args)
    cert, key = make_cert(tmp_path / "gw", "gw.test")
    cfg = base_config(
        be.url,
        backend={"tls": "required", "ca_file": str(bcert), "server_name": "backend.test"},
    )
    return be, gateway_factory(tls_listener(cfg, cert, key))


def test_requiretls_only_over_tls_and_passed_to_a_verified_backend(
    tmp_path: Path,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    be, gw = _verified_backend_pair(tmp_path, backend_factory, gateway_factory, "--requiretls")
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("c.test")
        assert "requiretls" not in s.esmtp_features  # not promised over plaintext
        code, msg = s.mail("a@sender.test", ["REQUIRETLS"])
        assert (code, msg[:6]) == (530, b"5.7.10")
        s.starttls(context=no_verify())
        s.ehlo("c.test")
        assert "requiretls" in s.esmtp_features
        assert s.mail("a@sender.test", ["REQUIRETLS"])[0] == 250
        assert s.rcpt("x@example.test")[0] == 250
        assert s.data(MSG)[0] == 250
    [m] = be.messages()
    assert m["tls"] is True and m["requiretls"] is True


def test_requiretls_is_refused_rather_than_dropped(
    tmp_path: Path,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    # The backend has TLS but no REQUIRETLS.
    be, gw = _verified_backend_pair(tmp_path, backend_factory, gateway_factory)
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.starttls(context=no_verify())
        s.ehlo("c.test")
        # Known only once MAIL reaches the backend: with the first RCPT.
        assert s.mail("a@sender.test", ["REQUIRETLS"])[0] == 250
        code, msg = s.rcpt("x@example.test")
        assert (code, msg[:6]) == (550, b"5.7.30")
        s.rset()
        assert s.mail("a@sender.test")[0] == 250  # without it, mail flows
        assert s.rcpt("x@example.test")[0] == 250
    assert not be.messages()


def test_requiretls_to_a_backend_without_verified_tls_is_refused_at_mail(
    backend: Backend, gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """Without `backend.tls: required` no backend session can honour REQUIRETLS, which
    the gateway knows before it has one: refused at MAIL, deferred or not."""
    cert, key = make_cert(tmp_path / "gw", "gw.test")
    gw = gateway_factory(tls_listener(base_config(backend.url), cert, key))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.starttls(context=no_verify())
        s.ehlo("c.test")
        code, msg = s.mail("a@sender.test", ["REQUIRETLS"])
        assert (code, msg[:6]) == (550, b"5.7.30")
    assert not any(c.startswith("MAIL") for c in backend.commands())


def test_implicit_tls_behind_proxy_protocol_with_the_hello_in_the_same_packet(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    cert, key = make_cert(tmp_path)
    cfg = base_config(backend.url, proxy_networks=["127.0.0.0/8"])
    cfg["listeners"][0].update(
        tls="implicit", cert_file=str(cert), key_file=str(key), proxy_protocol=True
    )
    gw = gateway_factory(cfg)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = no_verify().wrap_bio(incoming, outgoing, server_hostname="gw.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    with socket.create_connection(("127.0.0.1", gw.port()), timeout=10) as raw:
        # The load balancer's header and the client's ClientHello in one write.
        raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 465\r\n" + outgoing.read())
        while True:
            data = raw.recv(65536)
            assert data, "connection closed during the handshake"
            incoming.write(data)
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
        raw.sendall(outgoing.read())
        greeting = b""
        while b"\r\n" not in greeting:
            try:
                greeting += tls.read(1024)
            except ssl.SSLWantReadError:
                incoming.write(raw.recv(65536))
        assert greeting.startswith(b"220 ")
    ev = gw.wait_log(lambda e: e.get("event") == "disconnect")
    assert ev["client"] == "192.0.2.7"
