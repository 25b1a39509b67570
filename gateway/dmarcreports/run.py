"""One reporting run: every interval that has ended (and its `send_delay`), each
of its groups (policy domain and published policy) one report, sent to each
authorised destination of the domain's rua; then the retries of earlier runs.

Bounds: at most `max_domains` policy domains reported per interval (the domains
with the most mail first, a domain's groups summed: the rest are dropped and
counted), at most `max_records` records in a report and `max_report_size` bytes of
its XML (the most frequent: an <error> in the report says how many were left out),
no message larger than `max_report_size` or a destination's own limit ("!" in
rua). The XML, its gzip and the MIME message are made in a thread: a large report
is a second of CPU that the event loop, serving mail in the same process, never
waits for. Nothing is built for a group no destination may receive.

One domain's failure (its DNS, its destination, the relay refusing it, even a
report that fails to build) never stops the others, and never loses its rows
without a trace: rows the store could not read stay for the next run; a report
that failed to build is counted as dropped (report_error) and logged. A report
the relay could not take for a temporary reason, or whose destination's
authorisation lookup failed (temperror), is kept in the store's outbox and tried
at the next `retries` runs (the authorisation asked again), then dropped.

A dry run reads the store, checks the destinations and builds every report, and
prints what would be sent instead of sending it; it changes nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway import config, logs, metrics
from gateway.dmarcreports import feedback, message
from gateway.dmarcreports.record import Row, hostname
from gateway.dmarcreports.relay import Relay, SendFailed, send
from gateway.dmarcreports.rua import Authorizer, Destination, Verdict, destinations
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
            authorizer = Authorizer(self.resolver)
            if not dry_run:
                await self._retry(summary, authorizer)
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

    async def _leased(self, dry_run: bool) -> bool:
        """The lease, renewed before each report and each retry: a run that outlived
        it (a relay slow for hours) stops rather than race the process that took it."""
        if dry_run or await self.store.lease(LEASE, self.holder, LEASE_TTL):
            return True
        log.warning("DMARC report run: lease lost; the rest is left to its holder")
        return False

    def _drop(self, group: Group, reason: str, dry_run: bool, out: Callable[[str], None]) -> None:
        if dry_run:
            out(f"# {group.domain}: {group.messages} messages dropped: {reason}")
            return
        metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, reason).inc(group.messages)
        logs.failure("dmarc_report", domain=group.domain, result=reason, messages=group.messages)

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
        # max_domains counts policy domains, ranked by all their mail: a domain whose
        # record text changes all day has many groups, each small, and one rank.
        totals: dict[str, int] = {}
        for group in groups:
            totals[group.domain] = totals.get(group.domain, 0) + group.messages
        ranked = sorted(totals, key=lambda d: (-totals[d], d))
        kept = set(ranked[: self.cfg.max_domains])
        told: set[str] = set()  # domains whose lost count a report carried
        complete = True
        for group in groups:
            if not await self._leased(dry_run):
                return
            if not hostname(group.domain):
                # Recorded before domains were checked: never a report (message.py).
                self._drop(group, "bad_domain", dry_run, out)
            elif group.domain not in kept:
                if not dry_run:
                    metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "domain_limit").inc(
                        group.messages
                    )
                else:
                    out(f"# {group.domain}: past max_domains ({self.cfg.max_domains}): dropped")
            else:
                try:
                    rows = await self.store.rows(group, self.cfg.max_records)
                    dropped = 0
                    if group.domain not in told:
                        told.add(group.domain)
                        dropped = await self.store.dropped(interval, group.domain)
                except Exception:
                    # The store did not answer: its rows stay for the next run.
                    log.exception("DMARC report for %s: its rows could not be read", group.domain)
                    complete = False
                    continue
                try:
                    await self._report(group, rows, dropped, now, authorizer, summary, dry_run, out)
                except Exception:
                    # One domain's report never stops the others'; its rows go, counted
                    # and logged, rather than fail again at every run.
                    log.exception("DMARC report for %s failed", group.domain)
                    self._drop(group, "report_error", dry_run, out)
            if not dry_run:
                await self.store.delete_group(group)
        if not dry_run and complete:
            await self.store.clear_dropped(interval)

    async def _report(
        self,
        group: Group,
        rows: list[tuple[Row, int]],
        dropped: int,
        now: float,
        authorizer: Authorizer,
        summary: Summary,
        dry_run: bool,
        out: Callable[[str], None],
    ) -> None:
        cfg = self.cfg
        report_id = uuid.uuid4().hex
        begin, end = group.interval, group.interval + cfg.interval - 1
        summary.reports += 1
        if dry_run:
            out(
                f"# report {report_id}: domain {group.domain}, {begin}-{end}, "
                f"{len(rows)} records, {group.messages} messages"
            )
        # Where it may go first: nothing is built for no destination.
        wanted: list[tuple[Destination, Verdict]] = []
        for dest in destinations(group.policy.rua, cfg.max_uris):
            verdict = await authorizer.check(group.domain, dest)
            if verdict == "unauthorized":
                self._not_sent(summary, group, dest.address, report_id, verdict, dry_run, out)
            else:
                wanted.append((dest, verdict))
        if not wanted:
            return
        errors = []
        if group.rows > len(rows):
            errors.append(f"{group.rows - len(rows)} records left out: more than {cfg.max_records}")
        if dropped:
            errors.append(f"{dropped} messages of this domain were not recorded (limits reached)")
        meta = feedback.Metadata(
            self.org_name, self.email, cfg.extra_contact_info, report_id, begin, end, tuple(errors)
        )
        limits = {
            d.address: min(d.limit or cfg.max_report_size, cfg.max_report_size) for d, _ in wanted
        }
        # The gzip as base64 alone passes the largest limit past 3/4 of it: no need
        # to write more of it.
        built = await asyncio.to_thread(
            feedback.report,
            meta,
            group.domain,
            group.policy,
            rows,
            cfg.max_report_size,
            max(limits.values()) * 3 // 4,
        )
        if built.bad_rows and not dry_run:
            metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "bad_address").inc(built.bad_messages)
        for dest, verdict in wanted:
            env = message.Envelope(self.email, dest.address, group.domain, report_id, begin, end)
            msg = None
            if built.gz is not None:
                msg = await asyncio.to_thread(message.compose, env, self.org_name, built.gz, now)
            if msg is None or len(msg) > limits[dest.address]:
                self._not_sent(summary, group, dest.address, report_id, "too_big", dry_run, out)
                continue
            if dry_run:
                name = message.filename(env)
                what = "would send" if verdict == "ok" else f"{verdict}: would keep"
                out(f"#   to {dest.address}: {what} {name} ({len(msg)} bytes)")
                continue
            item = Outgoing(report_id, dest.address, group.domain, msg, 0)
            if verdict == "ok":
                await self._send(item, summary)
            else:
                await self._keep(item, verdict, "authorisation lookup failed", summary)
        if dry_run:
            if built.gz is None:
                out(f"# report {report_id}: too big for every destination: not built in full")
            else:
                out(gzip.decompress(built.gz).decode())

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

    async def _keep(self, item: Outgoing, reason: str, error: str, summary: Summary) -> None:
        """A report not handed over for a temporary reason: into the outbox for the
        next run, or dropped once its retries are used."""
        if item.attempts < self.cfg.retries:
            await self.store.outbox_put(
                Outgoing(item.report_id, item.rcpt, item.domain, item.message, item.attempts + 1)
            )
            result = reason
        else:
            result = "dropped"
        summary.count(result)
        logs.failure(
            "dmarc_report",
            domain=item.domain,
            rcpt=item.rcpt,
            report_id=item.report_id,
            result=result,
            error=error,
        )

    async def _send(self, item: Outgoing, summary: Summary) -> None:
        try:
            reply = await self.sender(self.relay, self.email, item.rcpt, item.message)
        except SendFailed as e:
            if e.temporary:
                await self._keep(item, e.reason, str(e), summary)
                return
            summary.count(e.reason)
            logs.failure(
                "dmarc_report",
                domain=item.domain,
                rcpt=item.rcpt,
                report_id=item.report_id,
                result=e.reason,
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

    async def _retry(self, summary: Summary, authorizer: Authorizer) -> None:
        """The outbox, one message at a time (never all read at once), under the
        lease; each destination's authorisation asked again."""
        for report_id, rcpt in await self.store.outbox_keys():
            if not await self._leased(False):
                return
            item = await self.store.outbox_get(report_id, rcpt)
            if item is None:
                continue
            await self.store.outbox_delete(report_id, rcpt)
            dest = Destination(item.rcpt, item.rcpt.rpartition("@")[2].lower())
            verdict = await authorizer.check(item.domain, dest)
            if verdict == "ok":
                await self._send(item, summary)
            elif verdict == "temperror":
                await self._keep(item, verdict, "authorisation lookup failed", summary)
            else:
                summary.count(verdict)
                logs.event(
                    "dmarc_report",
                    domain=item.domain,
                    rcpt=item.rcpt,
                    report_id=item.report_id,
                    result=verdict,
                )
