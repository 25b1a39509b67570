"""`smtp-gateway dmarc-report`: off means nothing; on, one run against the store."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway import logs
from gateway.dmarcreports import command


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """The command sets logging up for its process (level, handler, stream): the
    tests after these must find it as it was."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logs._out.stream, logs._out.format
    yield
    logs.flush()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logs._out.stream, logs._out.format = saved[2], saved[3]


def write(tmp_path: Path, **reports: object) -> str:
    path = tmp_path / "gateway.yaml"
    cfg = {
        "backend": {"url": "smtp://127.0.0.1:9"},
        "dns": {"nameservers": ["127.0.0.1:9"]},
        "dmarc_reports": {"sqlite_path": str(tmp_path / "d.sqlite"), **reports},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_disabled_says_so_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert command.run(write(tmp_path), dry_run=False, now=None) == 0
    assert "nothing is recorded or sent" in capsys.readouterr().err
    assert not (tmp_path / "d.sqlite").exists()


def test_an_empty_store_makes_no_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, enabled=True, email="d@gw.test")
    assert command.run(path, dry_run=False, now=2_000_000_000) == 0
    assert "0 reports, 0 sent" in capsys.readouterr().out
    assert command.run(path, dry_run=True, now=2_000_000_000) == 0
