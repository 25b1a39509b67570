"""The DMARC report parts an App runs when dmarc_reports.enabled: the store, the
recorder every worker fills, and, in the one process that sends (schedule.py),
the scheduler."""

from __future__ import annotations

import asyncio
import contextlib

from gateway import config, metrics
from gateway.dmarcreports.record import Recorder
from gateway.dmarcreports.relay import relay_of
from gateway.dmarcreports.run import Reporter
from gateway.dmarcreports.schedule import Scheduler, is_sender
from gateway.dmarcreports.store import ReportStore, SqliteStore
from gateway.dns import Resolver

# Every result smtp_gateway_dmarc_reports_total may carry (run.py).
RESULTS = ("sent", "unauthorized", "temperror", "too_big", "refused", "relay_error", "dropped")
# Every reason smtp_gateway_dmarc_evaluations_dropped_total may carry (record.py,
# store.py, redisstore.py, run.py).
DROPPED = (
    "buffer_full",
    "store_full",
    "domain_full",
    "store_error",
    "domain_limit",
    "bad_domain",
    "bad_address",
    "report_error",
)


def buffer_share(cfg: config.DmarcReports) -> int:
    """Distinct rows one organisational domain may hold in a process's buffer: a
    tenth of it, or its share of the store if less."""
    return max(1, min(cfg.max_rows_per_domain, cfg.max_pending // 10))


def make_store(settings: config.Settings) -> ReportStore:
    cfg = settings.dmarc_reports
    if cfg.store == "redis":
        from gateway.dmarcreports.redisstore import RedisReportStore

        s = settings.store
        assert s.redis_url is not None  # config: dmarc_reports.store: redis needs it
        return RedisReportStore(
            s.redis_url, s.key_prefix, s.timeout, cfg.max_rows, cfg.max_rows_per_domain
        )
    return SqliteStore(cfg.sqlite_path, cfg.max_rows, max_rows_per_domain=cfg.max_rows_per_domain)


def reporter(settings: config.Settings, store: ReportStore, resolver: Resolver) -> Reporter:
    return Reporter(settings, store, resolver, relay_of(settings))


class DmarcReports:
    def __init__(self, settings: config.Settings, resolver: Resolver, worker: int) -> None:
        cfg = settings.dmarc_reports
        self.store = make_store(settings)
        self.recorder = Recorder(
            self.store,
            cfg.interval,
            cfg.max_pending,
            cfg.flush_interval,
            per_domain=buffer_share(cfg),
        )
        self.scheduler: Scheduler | None = None
        if is_sender(worker):
            self.scheduler = Scheduler(
                reporter(settings, self.store, resolver), cfg.interval, cfg.send_delay
            )
        self._tasks: list[asyncio.Task[None]] = []
        # Exported at zero, so that the first of each shows in increase().
        for reason in DROPPED:
            metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, reason)
        for result in RESULTS:
            metrics.child(metrics.DMARC_REPORTS, result)
        metrics.child(metrics.DMARC_EVALUATIONS_RECORDED)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.recorder.run()))
        if self.scheduler is not None:
            self._tasks.append(loop.create_task(self.scheduler.run()))

    async def stop(self) -> None:
        """Stop the tasks; what is buffered goes to the store, then it closes."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.recorder.flush()
        await self.store.close()
