"""The check interface (gateway/checks/base.py): the stages a configured check acts
at, the symbols the runner may emit for any check, and what counts as configurable."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from gateway.checks.base import Configurable, OffLoopCheck, active_stages, generic_symbols
from gateway.checks.relay import RelayCheck
from gateway.checks.tlspolicy import TlsPolicyCheck, TlsPolicyOptions
from gateway.vocab import Stage
from tests.unit.fakes import DictResolver


class Plain:
    """A check without active_stages and without options."""

    name: ClassVar[str] = "plain"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL, Stage.RCPT})


class Narrowing(Plain):
    """Claims a stage it does not declare: only declared stages may run."""

    def active_stages(self) -> set[Stage]:
        return {Stage.RCPT, Stage.DATA}


def test_a_check_acts_at_its_declared_stages_narrowed_by_what_is_configured() -> None:
    assert active_stages(Plain()) == {Stage.MAIL, Stage.RCPT}  # type: ignore[arg-type]
    assert active_stages(Narrowing()) == {Stage.RCPT}  # type: ignore[arg-type]
    assert active_stages(TlsPolicyCheck()) == frozenset()  # nothing configured
    tls = TlsPolicyCheck().configured(TlsPolicyOptions(require_tls_from=["a.test"]))
    assert active_stages(tls) == {Stage.MAIL}


def test_the_runner_may_emit_an_error_and_a_timeout_for_any_check() -> None:
    assert generic_symbols("spf") == {"spf.error", "spf.timeout"}


def test_configurable_means_having_configured() -> None:
    assert isinstance(TlsPolicyCheck(), Configurable)
    assert not isinstance(Plain(), Configurable)
    assert not isinstance(RelayCheck(["example.test"]), Configurable)


def test_an_off_loop_check_runs_in_its_own_bounded_threads_until_closed() -> None:
    check = OffLoopCheck(DictResolver({}), threads=2, name="offloop")

    async def go() -> str:
        import threading

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(check.pool, lambda: threading.current_thread().name)

    try:
        assert asyncio.run(go()).startswith("offloop")
        assert check.pool._max_workers == 2
    finally:
        check.close()
    assert check.pool._shutdown
