"""One reporting run: every interval that has ended (and its `send_delay`), each
of its groups (policy domain and published policy) one report, sent to each
authorised destination of the domain's rua; then the retries of earlier runs.

Bounds: at most `max_domains` reports per interval (the domains with the most mail
first: the rest are dropped and counted), at most `max_records` records in a report
(the most frequent: an <error> in the report says how many were left out), no
message larger than `max_report_size` or a destination's own limit ("!" in rua).
One domain's failure (its DNS, its destination, the relay refusing it) never stops
the others. A report the relay could not take for a temporary reason is kept in the
store's outbox and tried at the next `retries` runs, then dropped.

A dry run reads the store, checks the destinations and builds every report, and
prints what would be sent instead of sending it; it changes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway import config, logs, metrics
from gateway.dmarcreports import feedback, message
from gateway.dmarcreports.relay import Relay, SendFailed, send
from gateway.dmarcreports.rua import Authorizer, destinations
from gateway.dmarcreports.store import Group, Outgoing, ReportStore
from gateway.dns import Resolver

log = logging.getLogger("gateway.dmarcreports")

LEASE = "dmarc-report-run"
LEASE_TTL = 3600.0  # a run holding it longer is taken for dead

Sender = Callable[[Relay, str, str, bytes], Awaitable[str]]


@dataclass
class Summary:
    """What a run did, for its log line and the command's output."""

    skipped: bool = False  # another process holds the lease
    reports: int = 0
    sent: int = 0
    not_sent: dict[str, int] = field(default_factory=dict)  # by reason

    def count(self, result: str) -> None:
        metrics.child(metrics.DMARC_REPORTS, result).inc()
        if result == "sent":
            self.sent += 1
        else:
            self.not_sent[result] = self.not_sent.get(result, 0) + 1


class Reporter:
    def __init__(
        self,
        settings: config.Settings,
        store: ReportStore,
        resolver: Resolver,
        relay: Relay,
        *,
        clock: Callable[[], float] = time.time,
        sender: Sender = send,
    ) -> None:
        self.cfg = settings.dmarc_reports
        self.org_name = self.cfg.org_name or settings.hostname
        self.email = self.cfg.email or f"dmarc-reports@{settings.hostname}"
        self.store = store
        self.resolver = resolver
        self.relay = relay
        self.clock = clock
        self.sender = sender
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def run(
        self, now: float, *, dry_run: bool = False, out: Callable[[str], None] = print
    ) -> Summary:
        summary = Summary()
        if not dry_run and not await self.store.lease(LEASE, self.holder, LEASE_TTL):
            summary.skipped = True
            logs.event("dmarc_report_run", skipped="another process holds the lease")
            return summary
        try:
            if not dry_run:
                await self._retry(summary)
            authorizer = Authorizer(self.resolver)
            for interval in await self.store.intervals():
                if interval + self.cfg.interval + self.cfg.send_delay > now:
                    continue  # not over yet, or its last flushes may be on their way
                await self._interval(interval, now, authorizer, summary, dry_run, out)
        finally:
            if not dry_run:
                await self.store.release(LEASE, self.holder)
        logs.event(
            "dmarc_report_run",
            dry_run=dry_run,
            reports=summary.reports,
            sent=summary.sent,
            not_sent=summary.not_sent,
        )
        return summary

    async def _interval(
        self,
        interval: int,
        now: float,
        authorizer: Authorizer,
        summary: Summary,
        dry_run: bool,
        out: Callable[[str], None],
    ) -> None:
        groups = await self.store.groups(interval)
        dropped = await self.store.dropped(interval)
        for i, group in enumerate(groups):
            if not dry_run and not await self.store.lease(LEASE, self.holder, LEASE_TTL):
                # Renewed at each report: a run that outlived its lease (a relay
                # slow for hours) stops rather than race the process that took it.
                log.warning("DMARC report run: lease lost; the rest is left to its holder")
                return
            if i >= self.cfg.max_domains:
                if not dry_run:
                    metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "domain_limit").inc(
                        group.messages
                    )
                    await self.store.delete_group(group)
                else:
                    out(f"# {group.domain}: past max_domains ({self.cfg.max_domains}): dropped")
                continue
            try:
                await self._report(group, dropped, now, authorizer, summary, dry_run, out)
            except Exception:
                # One domain's report never stops the others'; its rows go, as sent
                # ones do, rather than fail again at every run.
                log.exception("DMARC report for %s failed", group.domain)
            if not dry_run:
                await self.store.delete_group(group)
        if not dry_run:
            await self.store.clear_dropped(interval)

    async def _report(
        self,
        group: Group,
        dropped: int,
        now: float,
        authorizer: Authorizer,
        summary: Summary,
        dry_run: bool,
        out: Callable[[str], None],
    ) -> None:
        cfg = self.cfg
        rows = await self.store.rows(group, cfg.max_records)
        errors = []
        if group.rows > len(rows):
            errors.append(f"{group.rows - len(rows)} records left out: more than {cfg.max_records}")
        if dropped:
            errors.append(f"{dropped} messages of this period were not recorded (store full)")
        report_id = uuid.uuid4().hex
        begin, end = group.interval, group.interval + cfg.interval - 1
        meta = feedback.Metadata(
            self.org_name, self.email, cfg.extra_contact_info, report_id, begin, end, tuple(errors)
        )
        xml = feedback.build(meta, group.domain, group.policy, rows)
        gz = feedback.compress(xml, end)
        summary.reports += 1
        if dry_run:
            out(
                f"# report {report_id}: domain {group.domain}, {begin}-{end}, "
                f"{len(rows)} records, {group.messages} messages"
            )
        for dest in destinations(group.policy.rua, cfg.max_uris):
            verdict = await authorizer.check(group.domain, dest)
            if verdict != "ok":
                self._not_sent(summary, group, dest.address, report_id, verdict, dry_run, out)
                continue
            env = message.Envelope(self.email, dest.address, group.domain, report_id, begin, end)
            msg = message.compose(env, self.org_name, gz, now)
            limit = min(dest.limit or cfg.max_report_size, cfg.max_report_size)
            if len(msg) > limit:
                self._not_sent(summary, group, dest.address, report_id, "too_big", dry_run, out)
                continue
            if dry_run:
                out(f"#   to {dest.address}: would send {message.filename(env)} ({len(msg)} bytes)")
                continue
            await self._send(Outgoing(report_id, dest.address, group.domain, msg, 0), summary)
        if dry_run:
            out(xml.decode())

    def _not_sent(
        self,
        summary: Summary,
        group: Group,
        rcpt: str,
        report_id: str,
        reason: str,
        dry_run: bool,
        out: Callable[[str], None],
    ) -> None:
        if dry_run:
            out(f"#   to {rcpt}: not sent: {reason}")
            return
        summary.count(reason)
        logs.event(
            "dmarc_report", domain=group.domain, rcpt=rcpt, report_id=report_id, result=reason
        )

    async def _send(self, item: Outgoing, summary: Summary) -> None:
        try:
            reply = await self.sender(self.relay, self.email, item.rcpt, item.message)
        except SendFailed as e:
            if e.temporary and item.attempts < self.cfg.retries:
                await self.store.outbox_put(
                    Outgoing(
                        item.report_id, item.rcpt, item.domain, item.message, item.attempts + 1
                    )
                )
                result = e.reason
            else:
                result = "dropped" if e.temporary else e.reason
            summary.count(result)
            logs.failure(
                "dmarc_report",
                domain=item.domain,
                rcpt=item.rcpt,
                report_id=item.report_id,
                result=result,
                error=str(e),
            )
            return
        summary.count("sent")
        logs.event(
            "dmarc_report",
            domain=item.domain,
            rcpt=item.rcpt,
            report_id=item.report_id,
            result="sent",
            relay=reply,
        )

    async def _retry(self, summary: Summary) -> None:
        for item in await self.store.outbox():
            await self.store.outbox_delete(item.report_id, item.rcpt)
            await self._send(item, summary)
