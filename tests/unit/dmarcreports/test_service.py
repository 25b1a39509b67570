"""The parts an App runs: which store, who schedules, what stopping keeps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway import config
from gateway.dmarcreports.service import DmarcReports, make_store
from gateway.dmarcreports.store import SqliteStore
from gateway.vocab import Action
from tests.unit.dmarcreports.helpers import context
from tests.unit.fakes import DictResolver


def settings(tmp_path: Path, **reports: Any) -> config.Settings:
    return config.Settings.model_validate(
        {
            "backend": {"url": "smtp://127.0.0.1:2526"},
            "dmarc_reports": {
                "enabled": True,
                "email": "d@gw.test",
                "sqlite_path": str(tmp_path / "d.sqlite"),
                **reports,
            },
        }
    )


def test_sqlite_by_default(tmp_path: Path) -> None:
    store = make_store(settings(tmp_path))
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "d.sqlite"
    asyncio.run(store.close())


def test_only_worker_zero_has_a_scheduler_and_stopping_keeps_what_was_buffered(
    tmp_path: Path,
) -> None:
    async def go() -> list[int]:
        sender = DmarcReports(settings(tmp_path), DictResolver({}), 0)
        other = DmarcReports(settings(tmp_path), DictResolver({}), 1)
        assert sender.scheduler is not None and other.scheduler is None
        other.start()
        other.recorder.note(context(), Action.ACCEPT, "delivered")
        await other.stop()
        await sender.store.close()
        store = SqliteStore(tmp_path / "d.sqlite", 10)
        try:
            return [g.messages for i in await store.intervals() for g in await store.groups(i)]
        finally:
            await store.close()

    assert asyncio.run(go()) == [1]


def test_a_domains_share_is_configured_in_the_store_and_the_buffer(tmp_path: Path) -> None:
    s = settings(tmp_path, max_rows_per_domain=500, max_pending=2000)
    store = make_store(s)
    assert isinstance(store, SqliteStore) and store.per_domain == 500
    asyncio.run(store.close())

    async def shares() -> tuple[int, int]:
        small = DmarcReports(s, DictResolver({}), 1)  # a tenth of the buffer: 200
        big = DmarcReports(settings(tmp_path, max_rows_per_domain=50), DictResolver({}), 1)
        await small.store.close()
        await big.store.close()
        return small.recorder.per_domain, big.recorder.per_domain

    assert asyncio.run(shares()) == (200, 50)


def test_an_email_whose_domain_is_no_host_name_is_refused() -> None:
    """Its domain is the Submitter in every report's Subject and file name."""
    for email in ("d@gw/x.test", "d@gw\x01.test", "d@[127.0.0.1]"):
        with pytest.raises(ValueError, match="not a host name"):
            config.DmarcReports(enabled=True, email=email)
    assert config.DmarcReports(enabled=True, email="d@gw_internal.test").email
