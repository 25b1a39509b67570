"""The parts an App runs: which store, who schedules, what stopping keeps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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
