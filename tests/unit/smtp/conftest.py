"""The settings of the in-memory session (tests/unit/smtp/sessions.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config
from tests.unit.smtp.sessions import POLICY


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    (tmp_path / "policy.yaml").write_text(POLICY)
    return config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
            "policy": str(tmp_path / "policy.yaml"),
            "limits": {"max_errors": 5, "max_junk_commands": 3},
        }
    )
