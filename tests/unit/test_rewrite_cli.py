"""`smtp-gateway rewrite` (gateway/rewrite_cli.py): each stage's result in order, from
the tables of the configured policy; a refusal is said with its reply code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.checks.relay import RelayCheck
from gateway.rewrite.engine import Rewriter
from gateway.rewrite.options import RewriteOptions
from gateway.rewrite_cli import recipient, run, sender

RELAY = RelayCheck(["example.org", "srs.example.org"])


def rw(**opts: object) -> Rewriter:
    return Rewriter(RewriteOptions.model_validate(opts), Path("."))


def test_a_recipient_passes_each_stage_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    r = rw(
        canonical_recipient={"rules": {"@old.example.org": "@example.org"}},
        virtual_alias={"rules": {"sales@example.org": ["a@example.org", "b@elsewhere.test"]}},
        srs={"enabled": True, "domain": "srs.example.org", "secrets": ["k"]},
    )
    assert recipient(r, RELAY, "<sales@old.example.org>") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "recipient <sales@old.example.org>"
    assert out[1].split() == ["canonical_recipient", "sales@example.org"]
    assert out[2].split()[:3] == ["relay", "control", "local:"]
    assert out[3].split() == ["srs_reverse", "(unchanged)"]
    assert out[4].split() == ["virtual_alias", "a@example.org,", "b@elsewhere.test"]
    assert "b@elsewhere.test leave our domains: SRS applies" in out[5]
    assert out[-1] == "  => a@example.org, b@elsewhere.test"


def test_a_recipient_that_is_not_local_is_refused_as_relay_control_would(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert recipient(rw(), RELAY, "<x@remote.test>") == 1
    assert "not local: 550 5.7.1" in capsys.readouterr().out


def test_an_alias_loop_and_a_forged_srs_address_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    loop = rw(
        virtual_alias={
            "rules": {"a@example.org": "b@example.org", "b@example.org": "a@example.org"}
        }
    )
    assert recipient(loop, RELAY, "<a@example.org>") == 1
    assert "(550 5.4.6)" in capsys.readouterr().out
    srs = rw(srs={"enabled": True, "domain": "srs.example.org", "secrets": ["k"]})
    assert recipient(srs, RELAY, "<SRS0=AAAAAAAAAAAA=AA=orig.test=user@srs.example.org>") == 1
    assert "(550 5.1.1)" in capsys.readouterr().out


def test_a_sender_shows_each_stage_and_its_srs_form(capsys: pytest.CaptureFixture[str]) -> None:
    r = rw(
        masquerade={"domains": ["example.org"]},
        srs={"enabled": True, "domain": "srs.example.org", "secrets": ["k"]},
    )
    assert sender(r, "<joe@host.example.org>") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["masquerade", "joe@example.org"]
    assert out[2].split()[0] == "srs_forward" and "@srs.example.org" in out[2]
    assert out[-1] == "  => <joe@example.org>"


def test_run_reads_the_configured_policy_and_refuses_a_bad_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump(
            {"rewrite": {"virtual_alias": {"rules": {"team@example.org": "x@example.org"}}}}
        )
    )
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        yaml.safe_dump({"policy": str(tmp_path / "p.yaml"), "local_domains": ["example.org"]})
    )
    assert run("team@example.org", False, str(cfg)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "  => x@example.org"
    assert run("not an address", False, str(cfg)) == 1
    assert "not a valid address" in capsys.readouterr().out
