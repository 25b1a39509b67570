"""`smtp-gateway check` (gateway/explain.py): the gateway's own session in memory,
its replies word for word, and the reply and action that decided."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config
from gateway.explain import EXIT_VERDICT, _deciding_reply, explain

CHECKS_OFF = {c: {"enabled": False} for c in ("spf", "dkim", "dmarc", "arc", "dnsbl")}
MESSAGE = b"From: a@sender.test\nSubject: s\n\n.dot\n"


def settings(tmp_path: Path, **policy: Any) -> config.Settings:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"checks": CHECKS_OFF, **policy}))
    return config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
            "policy": str(tmp_path / "p.yaml"),
            "dns": {"nameservers": ["127.0.0.1:9"]},
        }
    )


def report(s: config.Settings, rcpts: list[str], **kw: str) -> dict[str, Any]:
    args = {"client_ip": "192.0.2.10", "helo": "client.test", "mail_from": "a@sender.test"}
    args.update(kw)
    return asyncio.run(
        explain(s, MESSAGE, args["client_ip"], args["helo"], args["mail_from"], rcpts)
    )


def test_an_accepted_message_reports_the_session_and_our_fields(tmp_path: Path) -> None:
    out = report(settings(tmp_path), ["x@example.test"])
    assert out["action"] == "accept" and out["refused_at"] is None
    assert [s["command"] for s in out["conversation"]] == [
        "(connect)",
        "EHLO client.test",
        "MAIL FROM:<a@sender.test>",
        "RCPT TO:<x@example.test>",
        "DATA",
        "(message)",
        "QUIT",
    ]
    assert out["conversation"][0]["reply"] == ["220 mx.gw.test ESMTP ready"]
    assert out["reply"] == "250 2.0.0 Ok: queued"  # the accepting backend's, relayed
    assert out["added_fields"].startswith("Received: from client.test (")
    assert out["authentication_results"].startswith("Authentication-Results: mx.gw.test")
    assert EXIT_VERDICT[out["action"]] == 0


def test_a_relay_attempt_is_refused_at_rcpt_with_the_live_reply(tmp_path: Path) -> None:
    out = report(settings(tmp_path), ["x@elsewhere.test"])
    assert (out["action"], out["refused_at"], out["deciding_symbol"]) == (
        "reject",
        "rcpt",
        "relay.denied",
    )
    assert out["reply"] == "550 5.7.1 Relay access denied"
    assert out["added_fields"] == ""  # nothing reached the backend


def test_one_refused_recipient_of_two_refuses_that_recipient_only(tmp_path: Path) -> None:
    out = report(settings(tmp_path), ["x@elsewhere.test", "y@example.test"])
    assert out["action"] == "accept"
    assert out["reply"] == "250 2.0.0 Ok: queued"
    rcpt_stages = [s for s in out["stages"] if s["stage"].startswith("rcpt")]
    assert [s["action"] for s in rcpt_stages] == ["reject", "accept"]


def test_a_refusal_at_mail_stops_the_conversation_as_an_mta_would(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        checks={**CHECKS_OFF, "tls": {"require_tls_from": ["sender.test"]}},
        actions={"tls.required": "tempfail"},
    )
    out = report(s, ["x@example.test"])
    assert out["action"] == "tempfail" and out["refused_at"] == "mail"
    assert out["reply"].startswith("450 4.7.0 TLS required for sender.test")
    assert [c["command"] for c in out["conversation"]][-2:] == ["MAIL FROM:<a@sender.test>", "QUIT"]


def test_a_bad_address_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="bad address"):
        report(settings(tmp_path), ["not an address"])


def test_the_deciding_reply_is_the_refusing_stages_else_the_last() -> None:
    said = [
        {"command": "(connect)", "reply": ["220 hi"]},
        {"command": "RCPT TO:<a@x.test>", "reply": ["550 5.7.1 no"]},
        {"command": "RCPT TO:<b@x.test>", "reply": ["250 ok"]},
        {"command": "DATA", "reply": ["554 5.5.1 Error: no valid recipients"]},
        {"command": "QUIT", "reply": ["221 bye"]},
    ]
    assert _deciding_reply(said, "rcpt <a@x.test>") == ["550 5.7.1 no"]
    assert _deciding_reply(said, None) == ["550 5.7.1 no"]  # the first refusal, not DATA's
    said[3]["reply"] = ["250 queued"]
    assert _deciding_reply(said, None) == ["250 queued"]


def test_a_command_answered_by_closing_leaves_the_reply_before_it_deciding() -> None:
    """The session closed instead of answering (an empty reply): no IndexError, and
    the reply before it decided."""
    said = [
        {"command": "(connect)", "reply": ["220 hi"]},
        {"command": "MAIL FROM:<a@s.test>", "reply": ["451 4.7.1 later"]},
        {"command": "RCPT TO:<b@x.test>", "reply": []},
    ]
    assert _deciding_reply(said, "mail") == ["451 4.7.1 later"]
    assert _deciding_reply(said, "rcpt") == ["451 4.7.1 later"]
    assert _deciding_reply(said, None) == ["451 4.7.1 later"]
    assert _deciding_reply([{"command": "(connect)", "reply": []}], None) == []
