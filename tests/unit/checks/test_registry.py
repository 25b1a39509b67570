"""Which checks exist (gateway/checks/registry.py): built in the order they run, each
once, and the symbols the policy is validated against."""

from __future__ import annotations

from gateway import config
from gateway.checks.base import generic_symbols
from gateway.checks.registry import CHECK_CLASSES, all_known_symbols, build_checks
from gateway.store.memory import MemoryStore
from tests.unit.fakes import DictResolver


def test_the_checks_are_built_in_the_order_they_run_each_once() -> None:
    settings = config.Settings.model_validate({"local_domains": ["example.test"]})
    checks = build_checks(settings, DictResolver({}), MemoryStore())
    try:
        assert [type(c) for c in checks] == list(CHECK_CLASSES)
    finally:
        for c in checks:
            close = getattr(c, "close", None)
            if close is not None:
                close()
    names = [cls.name for cls in CHECK_CLASSES]
    assert len(set(names)) == len(names)


def test_known_symbols_are_each_checks_own_and_the_runners_for_it() -> None:
    known = all_known_symbols()
    for cls in CHECK_CLASSES:
        assert set(cls.symbols) <= known, cls.name
        assert generic_symbols(cls.name) <= known, cls.name
    assert {"relay.denied", "spf.fail", "dkim.pass", "dmarc.reject"} <= known
    owners = [s for cls in CHECK_CLASSES for s in cls.symbols]
    assert len(owners) == len(set(owners))  # no symbol belongs to two checks


def test_dmarc_runs_after_the_checks_whose_facts_it_reads() -> None:
    order = [cls.name for cls in CHECK_CLASSES]
    dmarc = next(cls for cls in CHECK_CLASSES if cls.name == "dmarc")
    assert dmarc.requires
    assert all(order.index(r) < order.index("dmarc") for r in dmarc.requires)
