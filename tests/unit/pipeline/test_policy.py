"""The policy (gateway/pipeline/policy.py): symbols to actions, what it refuses to load."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.policy import Policy
from gateway.vocab import Action


def test_policy_rejects_unknown_symbol_and_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "p.yaml"
    p.write_text("actions:\n  fake.bda: reject\n")
    with pytest.raises(ConfigError, match=r"actions\.fake\.bda: unknown symbol"):
        policy_mod.load(str(p), {"fake.bad"})
    p.write_text("actoins: {}\n")
    with pytest.raises(ConfigError, match="actoins: unknown key"):
        policy_mod.load(str(p), {"fake.bad"})


def test_relay_control_cannot_be_turned_into_an_open_relay(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "p.yaml"
    p.write_text("actions:\n  relay.denied: accept\n")
    with pytest.raises(ConfigError, match="no open relay"):
        policy_mod.load(str(p), {"relay.denied"})
    p.write_text("actions: {}\n")
    assert policy_mod.load(str(p), {"relay.denied"}).action_for("relay.denied") is Action.REJECT


def test_default_preset_names_every_policy_key() -> None:
    """policies/default.yaml is the reference: every key of the policy model is in it."""

    import yaml
    from pydantic import BaseModel

    data = yaml.safe_load((Path(__file__).parents[3] / "policies/default.yaml").read_text())
    missing: list[str] = []

    def walk(model: type[BaseModel], node: dict, path: str) -> None:  # type: ignore[type-arg]
        for name, field in model.model_fields.items():
            if name not in node:
                missing.append(path + name)
                continue
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, node[name], f"{path}{name}.")

    walk(Policy, data, "")
    assert missing == []
