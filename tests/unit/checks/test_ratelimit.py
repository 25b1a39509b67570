"""The rate-limit check (gateway/checks/ratelimit.py): its rates and the errors of its
options. The stores it counts in: tests/unit/store/."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.checks.ratelimit import parse_rate
from gateway.net import network_of


def test_parse_rate_and_networks() -> None:
    assert parse_rate("100/minute") == (100, 60.0)
    assert parse_rate("5/10s") == (5, 10.0)
    assert parse_rate("2/second") == (2, 1.0)
    for bad in ("0/minute", "x/minute", "5/fortnight"):
        with pytest.raises((ValueError, KeyError)):
            parse_rate(bad)
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"


def test_store_and_limit_config_errors_name_the_key(tmp_path: Path) -> None:
    from gateway import config
    from gateway.checks.registry import all_known_symbols
    from gateway.pipeline import policy

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("store:\n  redis_url: http://127.0.0.1:6379\n")
    with pytest.raises(config.ConfigError, match=r"store\.redis_url: .*redis://"):
        config.load(cfg, env={})
    pol = tmp_path / "p.yaml"
    pol.write_text(
        "checks:\n  ratelimit:\n    limits:\n      - {name: a, rate: 1/minute}\n"
        "    concurrency:\n      - {name: a, max: 2}\n"
    )
    with pytest.raises(config.ConfigError, match=r"checks\.ratelimit.*'a' is used twice"):
        policy.load(str(pol), all_known_symbols())
    pol.write_text(
        "checks:\n  ratelimit:\n    limits:\n      - {name: 'bad name', rate: 1/minute}\n"
    )
    with pytest.raises(config.ConfigError, match=r"checks\.ratelimit\.limits\.0\.name"):
        policy.load(str(pol), all_known_symbols())
