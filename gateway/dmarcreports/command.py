"""`smtp-gateway dmarc-report [--dry-run] [--now SECONDS]`: one reporting run
from the command line, against the store the configuration names (the same one
the running gateway fills), under the same lease as the gateway's own runs."""

from __future__ import annotations

import asyncio
import sys
import time

from gateway import config, logs


def run(path: str | None, dry_run: bool, now: float | None) -> int:
    settings = config.load(path)
    cfg = settings.dmarc_reports
    if not cfg.enabled:
        print("dmarc_reports.enabled is false: nothing is recorded or sent", file=sys.stderr)
        return 0
    logs.setup(settings.logging.level, settings.logging.format)
    return asyncio.run(_run(settings, dry_run, time.time() if now is None else now))


async def _run(settings: config.Settings, dry_run: bool, now: float) -> int:
    from gateway.dmarcreports.service import make_store, reporter
    from gateway.dns import Resolver

    store = make_store(settings)
    try:
        summary = await reporter(settings, store, Resolver(settings.dns)).run(now, dry_run=dry_run)
    finally:
        await store.close()
        logs.flush()
    if summary.skipped:
        print("another process is making reports now (the store's lease is held)", file=sys.stderr)
        return 1
    if not dry_run:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(summary.not_sent.items()))
        print(
            f"{summary.reports} reports, {summary.sent} sent"
            + (f"; not sent: {failed}" if failed else "")
        )
    return 0
