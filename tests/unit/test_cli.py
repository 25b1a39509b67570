"""The command line, in-process: `check` says its verdict in the exit status, and
refuses what is not an IP address; `ratelimit` refuses a limit that does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway import cli

CHECKS_OFF = {c: {"enabled": False} for c in ("spf", "dkim", "dmarc", "arc", "dnsbl")}


def setup(tmp_path: Path, action: str) -> list[str]:
    """A config whose policy gives `tls.required` (mail from sender.test without TLS,
    as every `check` is) the action under test; the arguments of a check."""
    policy = {
        "checks": {**CHECKS_OFF, "tls": {"require_tls_from": ["sender.test"]}},
        "actions": {"tls.required": action},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy))
    (tmp_path / "gw.yaml").write_text(
        yaml.safe_dump(
            {
                "hostname": "mx.gw.test",
                "local_domains": ["example.test"],
                "trusted_networks": [],
                "policy": str(tmp_path / "p.yaml"),
                "dns": {"nameservers": ["127.0.0.1:9"]},
            }
        )
    )
    (tmp_path / "m.eml").write_bytes(b"From: a@sender.test\r\nSubject: s\r\n\r\nhi\r\n")
    return ["check", str(tmp_path / "m.eml"), "--config", str(tmp_path / "gw.yaml"),
            "--helo", "client.test", "--client-ip", "192.0.2.10"]  # fmt: skip


@pytest.mark.parametrize(
    ("action", "sender", "rcpt", "status"),
    [
        ("accept", "a@other.test", "x@example.test", 0),
        ("tag", "a@sender.test", "x@example.test", 3),
        ("quarantine", "a@sender.test", "x@example.test", 4),
        ("tempfail", "a@sender.test", "x@example.test", 5),
        ("reject", "a@sender.test", "x@example.test", 6),
        ("accept", "a@other.test", "x@elsewhere.test", 6),  # relay denied
    ],
)
def test_check_says_its_verdict_in_the_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str, sender: str, rcpt: str,
    status: int,
) -> None:  # fmt: skip
    args = setup(tmp_path, action)
    assert cli.main([*args, "--mail-from", sender, "--rcpt", rcpt]) == status
    assert cli.main([*args, "--mail-from", sender, "--rcpt", rcpt, "--json"]) == status
    assert '"action"' in capsys.readouterr().out


def test_check_refuses_a_client_ip_that_is_not_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = setup(tmp_path, "accept")
    args[args.index("--client-ip") + 1] = "mail.example"
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--mail-from", "a@b.test", "--rcpt", "x@example.test"])
    assert e.value.code == 2
    assert "--client-ip: 'mail.example' is not an IP address" in capsys.readouterr().err


def test_ratelimit_refuses_a_limit_the_policy_does_not_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(tmp_path, "accept")
    cfg = str(tmp_path / "gw.yaml")
    assert cli.main(["ratelimit", "show", "per_ipp:192.0.2.7", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "per_ipp:192.0.2.7: no limit named 'per_ipp' in the policy" in err
    assert "(limits: conns_per_ip, conns_per_network)" in err


def test_check_reports_the_reply_that_decided(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relay attempt is decided at RCPT: its refusal is the deciding reply, not the
    DATA that follows for want of recipients; a tagged message's is its acceptance."""
    import json

    from gateway import replies
    from gateway.checks.relay import DENIED
    from gateway.vocab import Action

    args = setup(tmp_path, "tag")
    cli.main([*args, "--mail-from", "a@other.test", "--rcpt", "x@elsewhere.test", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["reply"] == str(replies.for_action(Action.REJECT, DENIED))
    cli.main([*args, "--mail-from", "a@sender.test", "--rcpt", "x@example.test", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "tag" and out["reply"].startswith("250 ")


@pytest.mark.parametrize(
    ("max_size", "too_big", "warned"),
    [
        (1_000_000, "accept", True),  # messages of 1 MB to 25 MiB pass unscanned
        (25 * 1024 * 1024, "accept", False),  # equal: none does (counted alike)
        (1_000_000, "reject", False),  # too big is refused, not passed
    ],
)
def test_config_check_warns_of_mail_too_big_for_the_virus_scan_and_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], max_size: int, too_big: str, warned: bool
) -> None:
    policy = {
        "checks": {"clamav": {"enabled": True, "max_size": max_size}},
        "actions": {"clamav.too_big": too_big},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy))
    (tmp_path / "gw.yaml").write_text(
        yaml.safe_dump(
            {"policy": str(tmp_path / "p.yaml"), "limits": {"max_message_size": 25 * 1024 * 1024}}
        )
    )
    assert cli.main(["config", "check", str(tmp_path / "gw.yaml")]) == 0
    err = capsys.readouterr().err
    assert ("checks.clamav.max_size" in err and "without the clamav scan" in err) is warned
