"""What the app builds (gateway/app.py), without starting it: the backend of each
URL, the message size advertised under a backend's SIZE, readiness while draining,
and a reload that refuses a broken policy. Start, drain and stop bind sockets and
run sessions: tests/integration/test_operations.py and test_listeners.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config
from gateway.app import PREFIX_ROOM, App, build_backend
from gateway.forward.backend import SmtpBackend
from gateway.forward.maildir import MaildirBackend
from gateway.vocab import Action

POLICY = "checks: {dnsbl: {enabled: false}}\n"


def settings(tmp_path: Path, backend: str = "smtp://127.0.0.1:1") -> config.Settings:
    (tmp_path / "p.yaml").write_text(POLICY)
    return config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "policy": str(tmp_path / "p.yaml"),
            "dns": {"nameservers": ["127.0.0.1:9"]},
            "backend": {"url": [backend]},
            "limits": {"max_message_size": 10_000_000},
        }
    )


def test_each_backend_url_gets_its_kind_of_backend(tmp_path: Path) -> None:
    assert isinstance(build_backend(settings(tmp_path)), SmtpBackend)
    maildir = build_backend(settings(tmp_path, f"maildir:{tmp_path / 'mail'}"))
    assert isinstance(maildir, MaildirBackend)


def test_the_size_advertised_leaves_room_under_the_backends_size(tmp_path: Path) -> None:
    app = App(settings(tmp_path))
    assert app.svc.max_size == 10_000_000
    assert b"SIZE 10000000" in app.listeners[0].ehlo_plain
    backend = app.backend
    assert isinstance(backend, SmtpBackend)
    backend.targets[0].size_limit = 5_000_000  # what its greeting said
    app._size_changed()
    assert app.svc.max_size == 5_000_000 - PREFIX_ROOM
    assert b"SIZE %d" % (5_000_000 - PREFIX_ROOM) in app.listeners[0].ehlo_plain
    backend.targets[0].size_limit = 50_000_000  # larger than ours: ours stands
    app._size_changed()
    assert app.svc.max_size == 10_000_000
    backend.targets[0].size_limit = 100  # never below 1024
    app._size_changed()
    assert app.svc.max_size == 1024


def test_ready_until_draining_whatever_the_backend_says(tmp_path: Path) -> None:
    app = App(settings(tmp_path))
    ready, details = app.readiness()
    assert ready and details["draining"] is False and "dns" in details
    app.svc.draining = True
    assert app.readiness()[0] is False


def test_a_reload_takes_a_good_policy_and_refuses_a_broken_one(tmp_path: Path) -> None:
    s = settings(tmp_path)
    app = App(s)
    assert app.runner.policy.action_for("relay.denied") is Action.REJECT
    Path(s.policy).write_text(POLICY + "actions: {relay.denied: tempfail}\n")
    assert app.reload() is True
    assert app.runner.policy.action_for("relay.denied") is Action.TEMPFAIL
    Path(s.policy).write_text("actions: {relay.denid: reject}\n")  # a typo
    assert app.reload() is False
    assert app.runner.policy.action_for("relay.denied") is Action.TEMPFAIL  # the old one stays


def test_a_policy_broken_at_start_is_a_configuration_error(tmp_path: Path) -> None:
    s = settings(tmp_path)
    Path(s.policy).write_text("actoins: {}\n")
    with pytest.raises(config.ConfigError, match="actoins"):
        App(s)


def test_dmarc_reports_are_recorded_only_when_on_and_scheduled_by_worker_zero(
    tmp_path: Path,
) -> None:
    off = App(settings(tmp_path))
    assert off.dmarc_reports is None and off.svc.dmarc is None
    on = settings(tmp_path).model_copy(
        update={
            "dmarc_reports": config.DmarcReports(
                enabled=True, email="d@gw.test", sqlite_path=tmp_path / "d.sqlite"
            )
        }
    )
    first = App(on, (None, 0))
    assert first.dmarc_reports is not None
    assert first.svc.dmarc is first.dmarc_reports.recorder
    assert first.dmarc_reports.scheduler is not None
    second = App(on, (None, 1), workers=2)
    assert second.dmarc_reports is not None and second.dmarc_reports.scheduler is None
