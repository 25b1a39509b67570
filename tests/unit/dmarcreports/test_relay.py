"""Handing a report over: which relay, AUTH only under TLS, what is temporary."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway import config
from gateway.dmarcreports import relay as relay_mod
from gateway.dmarcreports.relay import Relay, SendFailed, relay_of, send
from gateway.forward.client import BackendLost, SmtpClient, SmtpReply

OK = SmtpReply(250, ["2.0.0 ok"])


def settings(**reports: Any) -> config.Settings:
    return config.Settings.model_validate(
        {
            "hostname": "gw.test",
            "backend": {"url": ["lmtp://127.0.0.1:24", "smtp://127.0.0.1:2526"]},
            "dmarc_reports": {"enabled": True, "email": "d@gw.test", **reports},
        }
    )


def test_the_backend_is_the_relay_unless_one_is_named(tmp_path: Path) -> None:
    r = relay_of(settings())
    assert (r.host, r.port, r.helo, r.username) == ("127.0.0.1", 2526, "gw.test", None)
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    r = relay_of(
        settings(
            relay={
                "url": "smtp://192.0.2.25:587",
                "tls": "required",
                "username": "gw",
                "password_file": str(secret),
            }
        )
    )
    assert (r.host, r.port, r.username, r.password) == ("192.0.2.25", 587, "gw", "s3cret")
    assert r.tls is config.BackendTls.REQUIRED and r.tls_context is not None


class Fake:
    """A relay session answering from a table (command -> reply)."""

    def __init__(self, tls: bool, answers: dict[str, SmtpReply]) -> None:
        self.tls_active = tls
        self.answers = answers
        self.said: list[str] = []
        self.closed = False

    async def command(self, name: str, line: str) -> SmtpReply:
        self.said.append(line.split()[0] + (" " + line.split()[1] if name == "auth" else ""))
        return self.answers.get(name, OK)

    async def mail(self, sender: str, params: list[str]) -> tuple[SmtpReply, None]:
        self.said.append(f"MAIL {sender}")
        return self.answers.get("mail", OK), None

    async def rcpt(self, rcpt: str, params: list[str]) -> SmtpReply:
        self.said.append(f"RCPT {rcpt}")
        return self.answers.get("rcpt", OK)

    async def data(self, wire: bytes) -> list[SmtpReply]:
        self.said.append("DATA")
        self.wire = wire
        return [self.answers.get("data", OK)]

    async def quit(self) -> None:
        self.said.append("QUIT")

    def close(self) -> None:
        self.closed = True


def deliver(
    monkeypatch: pytest.MonkeyPatch, fake: Fake | Exception, relay: Relay
) -> tuple[str | SendFailed, Fake | None]:
    async def connect(*a: Any, **kw: Any) -> Fake:
        if isinstance(fake, Exception):
            raise fake
        return fake

    monkeypatch.setattr(SmtpClient, "connect", connect)
    try:
        return asyncio.run(send(relay, "d@gw.test", "r@own.test", b".x\r\n")), None
    except SendFailed as e:
        return e, None


RELAY = Relay("127.0.0.1", 25, "gw.test", config.BackendTls.OPPORTUNISTIC, 5.0)
AUTH = Relay("127.0.0.1", 587, "gw.test", config.BackendTls.REQUIRED, 5.0, None, "gw", "pw")


def test_a_report_is_handed_over_stuffed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(False, {})
    got, _ = deliver(monkeypatch, fake, RELAY)
    assert got == "250 2.0.0 ok"
    assert fake.said == ["MAIL d@gw.test", "RCPT r@own.test", "DATA", "QUIT"]
    assert fake.wire == b"..x\r\n" and fake.closed


def test_auth_plain_only_over_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(True, {})
    deliver(monkeypatch, fake, AUTH)
    assert fake.said[0] == "AUTH PLAIN" and fake.said[1] == "MAIL d@gw.test"
    plain = Fake(False, {})
    got, _ = deliver(monkeypatch, plain, AUTH)
    assert isinstance(got, SendFailed) and "no TLS" in str(got)
    assert plain.said == []  # the password never went out in the clear


@pytest.mark.parametrize(
    ("where", "code", "reason", "temporary"),
    [
        ("mail", 451, "relay_error", True),
        ("rcpt", 550, "refused", False),
        ("data", 452, "relay_error", True),
        ("data", 554, "refused", False),
        ("auth", 535, "refused", False),
    ],
)
def test_a_4xx_is_temporary_a_5xx_is_not(
    monkeypatch: pytest.MonkeyPatch, where: str, code: int, reason: str, temporary: bool
) -> None:
    fake = Fake(True, {where: SmtpReply(code, ["no"])})
    got, _ = deliver(monkeypatch, fake, AUTH)
    assert isinstance(got, SendFailed)
    assert (got.reason, got.temporary) == (reason, temporary)
    assert fake.closed


def test_a_relay_that_cannot_be_reached_is_temporary(monkeypatch: pytest.MonkeyPatch) -> None:
    got, _ = deliver(monkeypatch, BackendLost("connect refused"), RELAY)
    assert isinstance(got, SendFailed) and got.temporary and got.reason == "relay_error"


def test_module_uses_our_client() -> None:
    assert relay_mod.SmtpClient is SmtpClient
