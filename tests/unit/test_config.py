"""Configuration mistakes that used to pass `config check` and then failed at start
or silently refused mail: each is refused up front, naming the file and the key."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import cli, config
from gateway.config import ConfigError
from tests.support.certs import make_cert


def check(tmp_path: Path, data: dict[str, Any]) -> str:
    """`config check`'s verdict on `data`: "OK" or the error text."""
    f = tmp_path / "gw.yaml"
    f.write_text(yaml.safe_dump(data))
    try:
        cli.cmd_validate(config.load(str(f)), str(f))
    except ConfigError as e:
        return str(e)
    return "OK"


def L(port: int, address: str = "127.0.0.1", **kw: Any) -> dict[str, Any]:
    return {"name": f"l{port}{address}", "address": address, "port": port, **kw}


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        ({"listeners": []}, "listeners: at least one listener is needed"),
        ({"listeners": [L(2525), L(2525)]}, "listeners: names must be unique"),
        (
            {"listeners": [L(2525), {**L(2525), "name": "other"}]},
            "listeners.1: 127.0.0.1 port 2525 is also listeners.0's",
        ),
        (
            {"listeners": [L(2525, "::"), L(2525, "::1")]},
            "listeners.1: ::1 port 2525 is also listeners.0's",
        ),
        (  # :: takes IPv4 clients too
            {"listeners": [L(2525, "0.0.0.0"), L(2525, "::")]},
            "listeners.1: :: port 2525 is also listeners.0's",
        ),
        (
            {"listeners": [L(2525, "0.0.0.0"), L(2525, "127.0.0.2")]},
            "listeners.1: 127.0.0.2 port 2525 is also listeners.0's",
        ),
        (
            {"listeners": [L(2525)], "metrics": {"listen": "127.0.0.1:2525"}},
            "metrics.listen: 127.0.0.1:2525 is also listeners.0's address and port",
        ),
        (
            {"listeners": [L(2525, proxy_protocol=True)]},
            "listeners.0.proxy_protocol: true needs proxy_networks",
        ),
        ({"local_domains": ["example..test"]}, "local_domains: 'example..test' is not a domain"),
        ({"local_domains": ["-x.test"]}, "'-x.test' is not a domain"),
        ({"local_domains": ["a" * 64 + ".test"]}, "is not a domain"),
        ({"policy": "strct"}, "policy: 'strct' is no preset (presets: default, monitor, strict;"),
        ({"policy": "/nonexistent/p.yaml"}, "policy: /nonexistent/p.yaml: no such file"),
        ({"dmarc_reports": {"enabled": True}}, "dmarc_reports: email: required when enabled"),
        ({"dmarc_reports": {"email": "nobody"}}, "dmarc_reports: email: 'nobody' is not an"),
        ({"dmarc_reports": {"interval": 7000}}, "dmarc_reports.interval: 7000 does not divide"),
        (
            {"dmarc_reports": {"enabled": True, "email": "d@gw.test"}},
            "dmarc_reports.relay.url: required: the backend is not smtp://",
        ),
        (
            {
                "backend": {"url": "smtp://127.0.0.1:25"},
                "dmarc_reports": {"enabled": True, "email": "d@gw.test", "store": "redis"},
            },
            "dmarc_reports.store: redis needs store.redis_url",
        ),
        (
            {"dmarc_reports": {"relay": {"url": "smtp://r.test:587", "username": "u"}}},
            "username and password_file go together",
        ),
        (
            {"dmarc_reports": {"relay": {"url": "lmtp://r.test"}}},
            "dmarc_reports.relay.url: 'lmtp://r.test': must be smtp://host:port",
        ),
    ],
)
def test_mistakes_are_refused_naming_the_file_and_key(
    tmp_path: Path, data: dict[str, Any], expect: str
) -> None:
    out = check(tmp_path, data)
    assert out.startswith(f"{tmp_path / 'gw.yaml'}: "), out
    assert expect in out, out


@pytest.mark.parametrize(
    "data",
    [
        {"listeners": [L(2525), L(2526)], "metrics": {"listen": "127.0.0.1:9125"}},
        {"listeners": [L(2525, "127.0.0.1"), L(2525, "127.0.0.2")]},
        {"listeners": [L(2525, "127.0.0.1"), L(2525, "::1")]},
        {"listeners": [L(0), {**L(0), "name": "other"}]},  # ephemeral ports never collide
        {"listeners": [L(2525, proxy_protocol=True)], "proxy_networks": ["10.0.0.0/8"]},
        {"local_domains": ["example.test", "*.example.test", "bücher.test", "_x.test"]},
        {"policy": "strict"},
        {"dmarc_reports": {"interval": 3600}},
        {
            "dmarc_reports": {
                "enabled": True,
                "email": "dmarc@gw.test",
                "relay": {"url": "smtp://192.0.2.25:587", "tls": "required"},
            }
        },
    ],
)
def test_what_is_right_still_passes(tmp_path: Path, data: dict[str, Any]) -> None:
    assert check(tmp_path, data) == "OK"


def tls_listener(cert: Path, key: Path) -> dict[str, Any]:
    return {"listeners": [L(2525, tls="starttls", cert_file=str(cert), key_file=str(key))]}


def test_certificate_problems_name_the_file_and_the_key(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path / "a", "gw.test")
    other_cert, other_key = make_cert(tmp_path / "b", "other.test")
    gw = tmp_path / "gw.yaml"
    assert check(tmp_path, tls_listener(cert, key)) == "OK"
    missing = tmp_path / "missing.pem"
    assert check(tmp_path, tls_listener(missing, key)) == (
        f"{gw}: listeners.0.cert_file: {missing}: no such file"
    )
    assert check(tmp_path, tls_listener(cert, other_key)) == (
        f"{gw}: listeners.0.key_file: {other_key}: not the private key of "
        f"listeners.0.cert_file ({cert})"
    )
    assert check(tmp_path, tls_listener(key, key)) == (
        f"{gw}: listeners.0.cert_file: {key}: no PEM certificate in it"
    )
    assert check(tmp_path, tls_listener(cert, cert)) == (
        f"{gw}: listeners.0.key_file: {cert}: no PEM private key in it"
    )
    assert check(tmp_path, tls_listener(cert, tmp_path)) == (
        f"{gw}: listeners.0.key_file: {tmp_path}: a directory, not a file"
    )
    sni = tls_listener(cert, key)
    sni["listeners"][0]["certificates"] = [{"cert_file": str(other_cert), "key_file": str(key)}]
    assert check(tmp_path, sni) == (
        f"{gw}: listeners.0.certificates.0.key_file: {key}: not the private key of "
        f"listeners.0.certificates.0.cert_file ({other_cert})"
    )


def test_an_unreadable_key_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a gateway not running as root sees a key only root may read (the tests may
    run as root, who reads everything: the refusal is the file system's, faked)."""
    cert, key = make_cert(tmp_path / "a", "gw.test")
    read = Path.read_bytes

    def refusing(self: Path) -> bytes:
        if self == key:
            raise PermissionError(13, "Permission denied")
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", refusing)
    monkeypatch.setattr("ssl.SSLContext.load_cert_chain", _refuse_key(key))
    assert check(tmp_path, tls_listener(cert, key)).endswith(
        f"listeners.0.key_file: {key}: not readable by this user (permission denied)"
    )


def _refuse_key(key: Path) -> Callable[..., None]:
    real = ssl.SSLContext.load_cert_chain

    def load(self: ssl.SSLContext, certfile: str, keyfile: str | None = None) -> None:
        if keyfile == str(key):
            raise PermissionError(13, "Permission denied")
        real(self, certfile, keyfile)

    return load


def test_loading_the_config_does_not_import_prometheus_client(tmp_path: Path) -> None:
    """With workers, the metrics storage is chosen when prometheus_client is first
    imported, which must come after the multiprocess setup: reading any config key
    (dns.nameservers used to pull in gateway.metrics) must not import it."""
    import subprocess
    import sys

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "dns: {nameservers: ['127.0.0.1:53']}\nstore: {redis_url: 'redis://127.0.0.1:1'}\n"
        "workers: 2\n"
    )
    code = (
        "import sys; from gateway import config; config.load(sys.argv[1]); "
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
