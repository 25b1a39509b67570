"""`smtp-gateway check` answers what a live session answers, command by command.

Each case is played twice: against a running gateway (a real process, a real
backend that accepts) and through `check`'s session in memory, with the same
configuration, policy and DNS. The gateway's own replies must be identical, word
for word; a reply the backend gave (2xx to MAIL, RCPT and the message) is
compared by its code, as the backends differ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway import config
from gateway.explain import explain, offline_services, play
from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient

CLIENT = "127.0.0.5"
MESSAGE = b"From: a@sender.test\r\nTo: x@example.test\r\nSubject: s\r\n\r\nhi\r\n"

POLICY = """
actions:
  dnsbl.listed: {listed}
checks:
  dnsbl:
    zones:
      - {{name: local, zone: bl.test, use_txt: true}}
rewrite:
  canonical_recipient:
    rules: {{"@old.test": "@example.test"}}
"""

# (name, dnsbl action, listed, conversation after the greeting)
CASES = [
    ("accepted", "reject", False, ["EHLO c.test", "MAIL FROM:<a@sender.test>",
                                   "RCPT TO:<x@example.test>", "DATA", MESSAGE]),
    ("rewritten before the rcpt checks", "reject", False,
     ["EHLO c.test", "MAIL FROM:<a@sender.test>", "RCPT TO:<x@old.test>", "DATA", MESSAGE]),
    ("relay denied, then no valid recipients", "reject", False,
     ["EHLO c.test", "MAIL FROM:<a@sender.test>", "RCPT TO:<x@remote.test>", "DATA"]),
    ("bad syntax and sequence", "reject", False,
     ["MAIL FROM:<a@sender.test>", "EHLO c.test", "RCPT TO:<x@example.test>",
      "MAIL FROM:<a@sender.test> SIZE=\u00b2", "MAIL FROM:<a@sender.test> BODY=X", "DATA"]),
    ("listed: 554 naming the zone, then 503 until QUIT", "reject", True, ["EHLO c.test"]),
    ("listed, tempfail: 421 at connect", "tempfail", True, []),
]  # fmt: skip


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(
        {
            # RFC 5782's test entries, so that the zone is healthy, and the client.
            "2.0.0.127.bl.test": [("A", "127.0.0.2")],
            "5.0.0.127.bl.test": [("A", "127.0.0.2"), ("TXT", "listed for a test")],
            # A zone that lists the client but not RFC 5782's test entry: unhealthy.
            "5.0.0.127.dead.test": [("A", "127.0.0.2")],
            "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
        }
    )
    yield server
    server.close()


def _cfg(backend: Backend, dns: DnsServer) -> dict[str, object]:
    return base_config(
        backend.url,
        trusted_networks=[],
        local_domains=["example.test"],
        dns={"nameservers": [dns.address], "timeout": 1},
    )


def _live(gw: Gateway, conversation: list[str | bytes]) -> list[tuple[str, str]]:
    """The conversation against the running gateway, played as `play` plays it."""
    said = []
    with RawClient(gw.port(), source=CLIENT) as c:
        code, text = c.reply()
        said.append(("(connect)", text))
        for item in conversation:
            if code in (0, 421):
                break  # the gateway closed the session, or is closing it
            if isinstance(item, bytes):
                if code == 354:
                    c.send(item + b".\r\n")
                    code, text = c.reply()
                    said.append(("(message)", text))
                continue
            code, text = c.cmd(item)
            if code:
                said.append((item, text))
        if code not in (0, 421):
            said.append(("QUIT", c.cmd("QUIT")[1]))
    return said


def _offline(
    cfg: dict[str, object], policy: Path, conversation: list[str | bytes]
) -> list[tuple[str, str]]:
    settings = config.Settings.model_validate({**cfg, "policy": str(policy)})

    async def go() -> list[dict[str, object]]:
        _, svc, _ = await offline_services(settings)
        return await play(svc, CLIENT, conversation)

    return [(str(s["command"]), "\n".join(s["reply"])) for s in asyncio.run(go())]  # type: ignore[arg-type]


def _backend_reply(command: str, text: str) -> bool:
    return text.startswith("2") and (command.startswith(("MAIL", "RCPT")) or command == "(message)")


@pytest.mark.parametrize(
    ("name", "action", "listed", "conversation"), CASES, ids=[c[0] for c in CASES]
)
def test_check_gives_the_live_sessions_replies(
    name: str,
    action: str,
    listed: bool,
    conversation: list[str | bytes],
    dns: DnsServer,
    backend: Backend,
    gateway_factory: Callable[..., Gateway],
    tmp_path: Path,
) -> None:
    policy_text = POLICY.format(listed=action)
    if not listed:
        policy_text = policy_text.replace("bl.test", "unlisted.test")
    cfg = _cfg(backend, dns)
    gw = gateway_factory(cfg, policy=policy_text)
    live = _live(gw, conversation)
    policy = tmp_path / "offline.yaml"
    policy.write_text(policy_text)
    offline = _offline(cfg, policy, conversation)
    assert [c for c, _ in offline] == [c for c, _ in live]
    for (command, text), (_, expected) in zip(offline, live, strict=True):
        if _backend_reply(command, expected):
            assert text[:3] == expected[:3], (command, text, expected)
        elif command.startswith("EHLO"):
            # The capabilities may differ in SIZE only: the live gateway learns the
            # backend's limit; the session in memory has none to learn.
            assert text.split("\n")[0] == expected.split("\n")[0]
            assert [x for x in text.split("\n") if "SIZE" not in x] == [
                x for x in expected.split("\n") if "SIZE" not in x
            ]
        else:
            assert text == expected, command


def test_check_reports_the_live_reply_to_a_listed_client(
    dns: DnsServer, backend: Backend, tmp_path: Path
) -> None:
    """The report's reply is the session's: the 554 names the zone and its reason."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY.format(listed="reject"))
    settings = config.Settings.model_validate({**_cfg(backend, dns), "policy": str(policy)})
    out = asyncio.run(explain(settings, MESSAGE, CLIENT, "c.test", "a@x.test", ["x@example.test"]))
    assert (
        out["reply"]
        == "554 5.7.1 Service unavailable; client blocked using bl.test: listed for a test"
    )
    assert out["refused_at"] == "connect" and out["action"] == "reject"
    assert [s["command"] for s in out["conversation"]] == ["(connect)", "QUIT"]


def test_check_skips_an_unhealthy_zone_as_the_gateway_does(
    dns: DnsServer, backend: Backend, tmp_path: Path
) -> None:
    """A zone that fails its test entries is skipped from the first mail at start,
    so a client it lists is greeted; `check` must health-check it too (it used to
    test the zones before the policy had given the check any)."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "actions:\n  dnsbl.listed: reject\n"
        "checks:\n  dnsbl:\n    zones:\n      - {name: dead, zone: dead.test}\n"
    )
    settings = config.Settings.model_validate({**_cfg(backend, dns), "policy": str(policy)})
    out = asyncio.run(explain(settings, MESSAGE, CLIENT, "c.test", "a@x.test", ["x@example.test"]))
    assert out["conversation"][0]["reply"][0].startswith("220 ")
    assert out["refused_at"] is None and out["action"] == "accept"
