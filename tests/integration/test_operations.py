"""Operator-facing behaviour: config check, env overrides, reload, embedded maildir."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.support.procs import PY, ROOT, Backend, Gateway, base_config, free_port
from tests.support.smtp import deliver

MSG = b"Subject: t\r\n\r\nhello\r\n"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=60
    )


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("backnd:\n  url: smtp://127.0.0.1:25\n", "backnd: unknown key"),
        ("listeners:\n  - port: abc\n", "listeners.0.port"),
        ("listeners:\n  - port: 70000\n", "listeners.0.port"),
        ("backend:\n  url: http://x\n", "backend.url"),
        ("limits:\n  max_recipients: 0\n", "limits.max_recipients"),
        (
            "limits:\n  max_message_size: 2000000\n  max_data_memory: 1000000\n",
            "limits.max_data_memory: 1000000 is less than max_message_size",
        ),
        ("trusted_networks: [not-a-net]\n", "trusted_networks"),
        ("listeners:\n  - tls: starttls\n", "listeners.0"),
        ("local_domains: ['*.']\n", "local_domains"),
        ("- a list\n", "top level must be a mapping"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_config_check_names_the_bad_key(tmp_path: Path, text: str, expect: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = run_cli("config", "check", str(f))
    assert r.returncode == 2, r
    assert expect in r.stderr, r.stderr


def test_config_check_accepts_a_good_file_and_names_a_bad_policy(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base_config("smtp://127.0.0.1:25")))
    r = run_cli("config", "check", str(good))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    pol = tmp_path / "p.yaml"
    pol.write_text("actions:\n  relay.denid: reject\n")
    bad = tmp_path / "badpol.yaml"
    bad.write_text(yaml.safe_dump({**base_config("smtp://127.0.0.1:25"), "policy": str(pol)}))
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2 and "actions.relay.denid: unknown symbol" in r.stderr
    pol.write_text("actions:\n  relay.denied: maybe\n")
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2 and "actions.relay.denied" in r.stderr


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("limits:\n  data_timeout: -1\n")
    r = run_cli("run", "--config", str(f))
    assert r.returncode == 2 and "limits.data_timeout" in r.stderr


def test_every_shipped_policy_is_valid() -> None:
    files = sorted((ROOT / "policies").glob("*.yaml"))
    assert files, "no policies shipped"
    for f in files:
        cfg = ROOT / "build" / f"check-{f.stem}.yaml"
        cfg.parent.mkdir(exist_ok=True)
        cfg.write_text(yaml.safe_dump({"policy": str(f)}))
        r = run_cli("config", "check", str(cfg))
        assert r.returncode == 0, (f, r.stderr)


def test_env_overrides_infrastructure_keys(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    port, mport = free_port(), free_port()
    cfg = base_config("smtp://127.0.0.1:1")
    gw = gateway_factory(
        cfg,
        env={
            "GATEWAY_LISTEN": f"127.0.0.1:{port}",
            "GATEWAY_BACKEND_URL": backend.url,
            "GATEWAY_METRICS_LISTEN": f"127.0.0.1:{mport}",
        },
    )
    assert deliver(port, MSG, helo="c.test")[0] == 250
    assert len(backend.messages()) == 1
    ev = gw.wait_log(lambda e: e.get("event") == "metrics_listening")
    assert ev["port"] == mport


def test_sighup_reloads_policy_and_refuses_a_bad_one(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url), policy="actions:\n  relay.denied: reject\n")
    ppath = gw.workdir / "policy.yaml"
    # Both results are exported from the start, at zero: the first reload, or the
    # first refused one, is an increase() a rule can see.
    body = urllib.request.urlopen(gw.metrics_url + "/metrics", timeout=5).read().decode()
    for result in ("ok", "failed"):
        assert f'smtp_gateway_config_reloads_total{{result="{result}"}} 0.0' in body
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        assert s.rcpt("x@remote.test")[0] == 550
        # Reload under an open session: the session survives; the open transaction
        # keeps the policy of its MAIL, the next one takes the new policy.
        ppath.write_text("actions:\n  relay.denied: tempfail\n")
        gw.signal(signal.SIGHUP)
        gw.wait_log(lambda e: e.get("event") == "reloaded")
        assert s.rcpt("x@remote.test")[0] == 550
        s.rset()
        s.mail("a@sender.test")
        code, msg = s.rcpt("x@remote.test")
        assert (code, msg[:5]) == (450, b"4.7.1")
        ppath.write_text("actions:\n  relay.denied: bogus\n")
        gw.signal(signal.SIGHUP)
        ev = gw.wait_log(lambda e: e.get("event") == "reload_failed")
        assert "actions.relay.denied" in ev["error"]
        assert ev["level"] == "warning"  # kept by logging.level: WARNING
        s.rset()
        s.mail("a@sender.test")
        assert s.rcpt("x@remote.test")[0] == 450  # the old policy stays
        assert s.noop()[0] == 250


def test_embedded_defaults_deliver_to_maildir(tmp_path: Path) -> None:
    """`smtp-gateway run` with no config: 127.0.0.1:2525 -> ./mail (port moved by env)."""
    port = free_port()
    gw = Gateway(
        tmp_path, {}, env={"GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_METRICS_LISTEN": "off"}
    )
    try:
        assert gw.cfg == {}
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.ehlo("c.test")
            s.mail("root@sender.test")
            assert s.rcpt("postmaster@localhost")[0] == 250
            assert s.rcpt("other@localhost")[0] == 250
            assert s.rcpt("x@remote.test")[0] == 550
            code, msg = s.data(MSG + b".leading dot\r\n")
            assert code == 250 and msg.startswith(b"2.0.0")
            # RFC 5321 4.5.1: the bare <Postmaster> is this host's postmaster.
            s.mail("root@sender.test")
            assert s.rcpt("<Postmaster>")[0] == 250
            assert s.data(MSG)[0] == 250
    finally:
        gw.stop()
    [bare] = [
        f
        for f in (tmp_path / "mail" / "localhost" / "postmaster" / "new").iterdir()
        if not f.read_bytes().endswith(b".leading dot\r\n")
    ]
    assert b"Delivered-To: postmaster\r\n" in bare.read_bytes()
    bare.unlink()
    for box in ("postmaster", "other"):
        files = list((tmp_path / "mail" / "localhost" / box / "new").iterdir())
        assert len(files) == 1
        body = files[0].read_bytes()
        assert body.startswith(b"Return-Path: <root@sender.test>\r\nDelivered-To: ")
        # smtplib stuffs the dot; the mailbox holds the original line.
        assert body.endswith(MSG + b".leading dot\r\n")
        assert not list((tmp_path / "mail" / "localhost" / box / "tmp").iterdir())


def test_embedded_default_listen_address() -> None:
    from gateway import config

    s = config.load(None, env={})
    assert (s.listeners[0].address, s.listeners[0].port) == ("127.0.0.1", 2525)
    assert s.backend.url == ["maildir:./mail"]


def test_swaks_against_embedded_defaults(tmp_path: Path) -> None:
    """The README's first promise, with the tool the README names."""
    import shutil

    swaks = shutil.which("swaks")
    assert swaks, "swaks is required (apt-get install swaks; .ci/run installs it)"
    port = free_port()
    gw = Gateway(
        tmp_path, {}, env={"GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_METRICS_LISTEN": "off"}
    )
    try:
        r = subprocess.run(
            [
                swaks,
                "--server",
                f"127.0.0.1:{port}",
                "--to",
                "postmaster@localhost",
                "--from",
                "someone@sender.test",
                "--header",
                "Subject: swaks test",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        [f] = (tmp_path / "mail" / "localhost" / "postmaster" / "new").iterdir()
        assert f"<-  250 2.0.0 Delivered as localhost/postmaster/new/{f.name}\n" in r.stdout
    finally:
        gw.stop()
    [f] = (tmp_path / "mail" / "localhost" / "postmaster" / "new").iterdir()
    assert b"Subject: swaks test" in f.read_bytes()


def test_health_command_asks_the_configured_metrics_endpoint(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """The container's HEALTHCHECK: it follows metrics.listen, from --config or
    $GATEWAY_CONFIG, and fails once the gateway is gone."""
    import os

    gw = gateway_factory(base_config(backend.url))
    url = f"{gw.metrics_url}/healthz/live"
    r = run_cli("health", "--config", str(gw.config_path))
    assert (r.returncode, r.stdout.strip()) == (0, f"{url}: 200"), r.stderr
    env = {**os.environ, "GATEWAY_CONFIG": str(gw.config_path)}
    r = subprocess.run([PY, "-m", "gateway", "health", "--ready"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60, env=env)  # fmt: skip
    assert (r.returncode, r.stdout.strip()) == (0, url.replace("live", "ready") + ": 200")
    gw.stop()
    r = run_cli("health", "--config", str(gw.config_path))
    assert r.returncode == 1 and url in r.stderr
