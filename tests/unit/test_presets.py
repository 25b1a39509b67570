"""Presets that inherit: `extends:` on the policy file, and what the shipped
presets promise (strict is never weaker than default; monitor never refuses)."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from gateway import config
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.config import ConfigError
from gateway.dns import Resolver
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.policy import REFUSE_ONLY
from gateway.pipeline.runner import Runner
from gateway.smtp.local import AcceptingBackend, LocalSession, plain_listener, services
from gateway.store.memory import MemoryStore
from gateway.vocab import Action

SYMBOLS = all_known_symbols()


def load(name: str) -> policy_mod.Policy:
    return policy_mod.load(name, SYMBOLS)


@functools.cache
def preset(name: str) -> policy_mod.Policy:
    """A shipped preset, loaded once for the module: a policy is immutable (frozen
    models), and the tests per symbol would load each one a hundred times over."""
    return load(name)


@pytest.mark.parametrize("symbol", sorted(SYMBOLS))
def test_strict_is_at_least_as_strong_as_default_for_every_symbol(symbol: str) -> None:
    default, strict = preset("default"), preset("strict")
    assert strict.action_for(symbol).strength >= default.action_for(symbol).strength


def test_strict_refuses_what_default_tags_and_keeps_what_default_refuses() -> None:
    default, strict = preset("default"), preset("strict")
    changed = {s for s in SYMBOLS if strict.action_for(s) is not default.action_for(s)}
    assert changed == {"spf.fail", "spf.permerror", "dmarc.quarantine"}
    for s in ("dnsbl.listed", "ratelimit.exceeded", "ratelimit.concurrency", "spf.temperror"):
        assert strict.action_for(s) is default.action_for(s), s
    assert strict.checks == default.checks and strict.check_timeout == default.check_timeout


@pytest.mark.parametrize("symbol", sorted(SYMBOLS - REFUSE_ONLY))
def test_monitor_never_refuses_defers_or_quarantines(symbol: str) -> None:
    assert preset("monitor").action_for(symbol) in (Action.ACCEPT, Action.TAG)


def test_monitor_still_refuses_relaying_and_runs_the_defaults_checks() -> None:
    monitor, default = preset("monitor"), preset("default")
    assert monitor.action_for("relay.denied") is Action.REJECT
    assert monitor.checks == default.checks


def test_a_limit_under_strict_refuses(tmp_path: Path) -> None:
    """A policy extending strict with a 1/hour limit: the second message is deferred
    (an unlisted symbol used to mean accept, so all of them passed)."""
    (tmp_path / "p.yaml").write_text(
        "extends: strict\nchecks:\n"
        + "".join(f"  {c}: {{enabled: false}}\n" for c in ("spf", "dkim", "dmarc", "arc"))
        + "  ratelimit:\n    limits:\n"
        + "      - {name: msgs, key: client_ip, unit: messages, rate: 1/hour}\n"
    )
    settings = config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
            "policy": str(tmp_path / "p.yaml"),
            "dns": {"nameservers": ["127.0.0.1:9"]},
        }
    )

    async def go() -> list[str]:
        pol = policy_mod.load(settings.policy, SYMBOLS)
        runner = Runner(build_checks(settings, Resolver(settings.dns), MemoryStore()), pol)
        svc = services(settings, runner, AcceptingBackend())
        s = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4000))
        try:
            await s.start()
            await s.send("EHLO client.test")
            out = []
            for _ in range(2):
                mail = await s.send("MAIL FROM:<a@sender.test>")
                if mail[0][:3] == "250":
                    await s.send("RCPT TO:<x@example.test>")
                    await s.send("DATA")
                    mail = await s.message(b"Subject: s\r\n\r\nhi\r\n")
                out.append(mail[0])
            return out
        finally:
            await s.close()

    assert asyncio.run(go()) == [
        "250 2.0.0 Ok: queued",
        "450 4.7.1 Rate limit exceeded, try again later",
    ]


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "actions: {spf.fail: reject, dnsbl.listed: reject}\n"
        "checks:\n  dnsbl: {threshold: 3, zones: [{name: a, zone: a.test}]}\n"
        "allowlist_skips: [spf, dkim]\ncheck_timeout: 9\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/child.yaml").write_text(
        "extends: ../base.yaml\nactions: {spf.fail: tag}\n"
        "checks:\n  dnsbl: {threshold: 2}\nallowlist_skips: [dmarc]\n"
    )
    p = load(str(tmp_path / "sub/child.yaml"))
    assert p.action_for("spf.fail") is Action.TAG  # the child's own
    assert p.action_for("dnsbl.listed") is Action.REJECT  # inherited
    assert p.checks.dnsbl.threshold == 2 and [z.name for z in p.checks.dnsbl.zones] == ["a"]
    assert p.allowlist_skips == ["dmarc"] and p.check_timeout == 9
    # A reload re-reads the base too: it is among the policy's files.
    assert p.files == [tmp_path / "sub/child.yaml", tmp_path / "sub/../base.yaml"]


def test_extends_mistakes_name_the_file_and_the_problem(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: extends: a\.yaml: a policy cannot extend"):
        load(str(a))
    a.write_text("extends: nosuchpreset\n")
    with pytest.raises(
        ConfigError,
        match=r"a\.yaml: extends: nosuchpreset: no such file or preset "
        r"\(presets: default, monitor, strict\)",
    ):
        load(str(a))
    a.write_text("extends: [default]\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: extends: must be a preset name"):
        load(str(a))
    a.write_text("extends: default\nactions: {spf.fial: reject}\n")
    with pytest.raises(
        ConfigError, match=r"a\.yaml \(extending .*default\.yaml\): actions\.spf\.fial"
    ):
        load(str(a))
    for i in range(10):
        (tmp_path / f"d{i}.yaml").write_text(f"extends: d{i + 1}.yaml\n" if i < 9 else "{}\n")
    with pytest.raises(ConfigError, match="over 8 policies deep"):
        load(str(tmp_path / "d0.yaml"))
