"""`smtp-gateway ratelimit show|reset` (gateway/ratelimit_admin.py): one line an
operator can act on per key, and a limit the policy does not have refused before
anything is asked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from gateway import config
from gateway.pipeline.policy import Policy
from gateway.ratelimit_admin import _via_http, describe, run
from gateway.store.base import CONC, RATE, Entry

POLICY = Policy.model_validate(
    {
        "checks": {
            "ratelimit": {
                "limits": [{"name": "msgs", "key": "client_ip", "rate": "6/minute", "burst": 2}],
                "concurrency": [{"name": "conns", "key": "client_ip", "max": 3}],
            }
        }
    }
)


def test_a_rate_key_says_what_is_used_left_and_when_it_drains() -> None:
    # 6/minute: a cell is 10 s; 25 s of debt is 2.5 messages used of 6 + 2.
    line = describe(Entry(RATE, "msgs:192.0.2.1", 25.0), POLICY)
    assert line == (
        "msgs:192.0.2.1: 2.5 of 8 messages used (6/minute, burst 2), 5.5 left, "
        "fully drained in 25.0s"
    )


def test_a_concurrency_key_says_its_slots_of_the_limit() -> None:
    assert describe(Entry(CONC, "conns:192.0.2.1", 2), POLICY) == (
        "conns:192.0.2.1: 2 of 3 connection slot(s) held"
    )
    assert describe(Entry(CONC, "gone:192.0.2.1", 1), POLICY) == (
        "gone:192.0.2.1: 1 connection slot(s) held"
    )


def test_a_key_of_a_limit_no_longer_in_the_policy_shows_its_debt() -> None:
    line = describe(Entry(RATE, "old:192.0.2.1", 12.25), POLICY)
    assert line == "old:192.0.2.1: 12.2s of debt (limit not in the current policy)"


def write_config(tmp_path: Path, **extra: object) -> Path:
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump({"checks": POLICY.model_dump(mode="json")["checks"]})
    )
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"policy": str(tmp_path / "p.yaml"), **extra}))
    return cfg


def test_a_limit_the_policy_does_not_have_is_refused_naming_the_ones_it_has(
    tmp_path: Path,
) -> None:
    cfg = write_config(tmp_path)
    with pytest.raises(config.ConfigError, match=r"no limit named 'nope'.*msgs, conns"):
        run("show", "nope:192.0.2.1", str(cfg))


def test_in_memory_counts_need_the_metrics_endpoint(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path, metrics={"listen": None}), env={})
    with pytest.raises(OSError, match=r"metrics\.listen is off"):
        asyncio.run(_via_http(settings, "show", "msgs"))
