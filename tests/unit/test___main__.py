"""`python -m gateway` (gateway/__main__.py): the command line's exit status is the
process's. Run as Python runs it (runpy): importing it would run it. Every
integration test starts the gateway this way (tests/support/procs.py)."""

from __future__ import annotations

import runpy

import pytest

from gateway import cli


def test_the_exit_status_is_what_the_command_line_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []

    def main(argv: list[str] | None = None) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr(cli, "main", main)
    with pytest.raises(SystemExit) as ei:
        runpy.run_module("gateway", run_name="__main__")
    assert ei.value.code == 7 and seen == [None]  # main reads sys.argv itself


def test_a_bad_command_line_exits_with_argparses_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["smtp-gateway", "no-such-command"])
    with pytest.raises(SystemExit) as ei:
        runpy.run_module("gateway", run_name="__main__")
    assert ei.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
