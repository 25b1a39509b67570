"""Every metric, defined once. Labels come from closed sets only: never an
address, a domain or an IP (those belong in logs)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import Any, overload

from prometheus_client import Counter, Gauge, Histogram

P = "smtp_gateway_"

# Updates are buffered in plain Python numbers and written to prometheus-client by
# `flush()`. Why: with workers, every prometheus-client update takes a lock, makes a
# getpid() system call and writes an mmap; a small message made 31 such updates,
# as many system calls as the whole message relay. A flush writes each changed
# series once. The app flushes every FLUSH_INTERVAL seconds, before answering a
# scrape (so a single process is always exact) and at shutdown; another worker's
# figures may so be up to FLUSH_INTERVAL old.
FLUSH_INTERVAL = 1.0

log = logging.getLogger("gateway.metrics")

_dirty: list[_Buffered] = []


class _Buffered:
    __slots__ = ("_dirty", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._dirty = False

    def _mark(self) -> None:
        if not self._dirty:
            self._dirty = True
            _dirty.append(self)

    def _write(self) -> None:
        raise NotImplementedError


class BufferedCounter(_Buffered):
    __slots__ = ("_n",)

    def __init__(self, metric: Counter) -> None:
        super().__init__(metric)
        self._n = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self._n += amount
        if not self._dirty:
            self._mark()

    def _write(self) -> None:
        n, self._n = self._n, 0.0
        if n:
            self._metric.inc(n)


class BufferedGauge(_Buffered):
    __slots__ = ("_delta", "_value")

    def __init__(self, metric: Gauge) -> None:
        super().__init__(metric)
        self._value: float | None = None  # a pending set(), applied before the delta
        self._delta = 0.0

    def set(self, value: float) -> None:
        self._value, self._delta = value, 0.0
        if not self._dirty:
            self._mark()

    def inc(self, amount: float = 1.0) -> None:
        self._delta += amount
        if not self._dirty:
            self._mark()

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def _write(self) -> None:
        value, delta = self._value, self._delta
        self._value, self._delta = None, 0.0
        if value is not None:
            self._metric.set(value)
        if delta:
            self._metric.inc(delta)


class BufferedHistogram(_Buffered):
    """Counts per bucket here; the flush adds them to the histogram's own bucket
    and sum values. Those two attributes (`_buckets`, `_sum`) are
    prometheus-client's layout since 0.4; tests/unit/test_metrics.py checks that a
    flushed histogram exposes exactly what direct observe() calls would."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, metric: Histogram) -> None:
        super().__init__(metric)
        self._bounds: list[float] = list(metric._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount, as Histogram.observe picks.
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount
        if not self._dirty:
            self._mark()

    def _write(self) -> None:
        m = self._metric
        counts, total = self._counts, self._sum
        self._counts, self._sum = [0] * len(counts), 0.0
        m._sum.inc(total)
        for bucket, n in zip(m._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


_samplers: list[Callable[[], None]] = []


def sample(fn: Callable[[], None]) -> None:
    """Have `fn` set its gauges at every flush: for a level that changes with every
    message (message memory in use), where an update per change would cost the
    hot path and a reading a second is all a scrape needs."""
    _samplers.append(fn)


def flush() -> None:
    """Write every buffered update to prometheus-client. One series that cannot be
    written (a bug: say, a labelled metric updated without labels) is logged and
    dropped; it must not stop the others, the periodic flush or a scrape."""
    for fn in _samplers:
        fn()
    pending = _dirty[:]
    _dirty.clear()
    for b in pending:
        b._dirty = False
        try:
            b._write()
        except Exception:
            log.exception("metric update dropped")


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


@overload
def child(metric: Histogram, *labels: str) -> BufferedHistogram: ...
@overload
def child(metric: Gauge, *labels: str) -> BufferedGauge: ...
@overload
def child(metric: Counter, *labels: str) -> BufferedCounter: ...
def child(metric: Any, *labels: str) -> Any:
    """The buffered series of `metric` for these label values (none: the metric
    itself), cached: labels() costs over a microsecond per call."""
    key = (metric, labels)
    c = _children.get(key)
    if c is None:
        series = metric.labels(*labels) if labels else metric
        kind = (
            BufferedHistogram
            if isinstance(metric, Histogram)
            else BufferedGauge
            if isinstance(metric, Gauge)
            else BufferedCounter
        )
        c = _children[key] = kind(series)
    return c


BUILD = Gauge(
    P + "build_info",
    "Always 1; the version of the running gateway is the label",
    ["version"],
    multiprocess_mode="max",
)
WORKER_RESTARTS = Counter(
    P + "worker_restarts_total",
    "Worker processes that died unexpectedly and were restarted",
)

CONNECTIONS = Counter(
    P + "connections_total",
    "Client connections by listener and result (accepted, or refused and why)",
    ["listener", "result"],
)
ACTIVE_CONNECTIONS = Gauge(
    P + "active_connections",
    "Client connections currently open",
    ["listener"],
    multiprocess_mode="livesum",
)
TRANSACTIONS = Counter(
    P + "transactions_total",
    "Mail transactions by outcome (delivered, rejected, tempfailed, aborted) and reason",
    ["outcome", "reason"],
)
RECIPIENTS = Counter(
    P + "recipients_total",
    "RCPT commands by outcome (accepted, rejected, tempfailed) and reason",
    ["outcome", "reason"],
)
TRANSACTION_SECONDS = Histogram(
    P + "transaction_seconds",
    "Time from MAIL to the transaction's end, by outcome (delivered, rejected, tempfailed,"
    " aborted): the client's wait, checks and the backend's replies included",
    ["outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
SESSION_SECONDS = Histogram(
    P + "session_seconds",
    "Time from connect to disconnect of client sessions",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
REFUSALS = Counter(
    P + "refusals_total",
    "What the policy refused, at every stage (connect, helo, mail, rcpt, data), by action"
    " (reject, tempfail) and the deciding symbol",
    ["stage", "action", "reason"],
)
COMMAND_ERRORS = Counter(
    P + "command_errors_total",
    "Client protocol errors by reason",
    ["reason"],
)
MESSAGE_SIZE = Histogram(
    P + "message_size_bytes",
    "Size of messages received in DATA",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
)
MESSAGE_MEMORY = Gauge(
    P + "message_memory_bytes",
    "Bytes of message data held in memory (being read, checked or relayed), or pledged to"
    " an admitted MAIL's SIZE= until its bytes come",
    multiprocess_mode="livesum",
)
MESSAGE_MEMORY_LIMIT = Gauge(
    P + "message_memory_limit_bytes",
    "The budget for message data in memory (limits.max_data_memory), over all workers",
    multiprocess_mode="livesum",
)
MESSAGE_MEMORY_WAITERS = Gauge(
    P + "message_memory_waiters",
    "MAILs waiting for room in the message data budget (limits.data_memory_wait)",
    multiprocess_mode="livesum",
)
MESSAGE_MEMORY_WAITS = Counter(
    P + "message_memory_waits_total",
    "MAILs that waited for room in the message data budget, by result (admitted;"
    " timeout: the client got 452 4.3.1)",
    ["result"],
)
CHECK_RESULTS = Counter(
    P + "check_results_total",
    "Symbols emitted by checks",
    ["check", "symbol"],
)
BACKEND_REPLIES = Counter(
    P + "backend_replies_total",
    "Replies from the backend by command and class (2xx, 4xx, 5xx, error)",
    ["command", "class"],
)
BACKEND_LATENCY = Histogram(
    P + "backend_reply_seconds",
    "Time from sending a command to the backend until its reply",
    ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BACKEND_CONNECTS = Counter(
    P + "backend_connects_total",
    "Backend connection attempts by result (ok, refused, timeout, busy: a 4xx greeting, failed)",
    ["result"],
)
BACKEND_SESSION_WAITS = Counter(
    P + "backend_session_waits_total",
    "Transactions that waited for a backend session at backend.max_sessions, by target"
    " and result (ok: got one; timeout: the client got 451 4.4.5)",
    ["target", "result"],
)
BACKEND_UP = Gauge(
    P + "backend_available",
    "1 while at least one backend target is usable (circuit closed or half-open)",
    multiprocess_mode="livemax",
)
CONFIG_RELOADS = Counter(
    P + "config_reloads_total",
    "Policy reloads by result",
    ["result"],
)
DNS_QUERIES = Counter(
    P + "dns_queries_total",
    "DNS queries sent, by record type and outcome (ok, nxdomain, nodata, servfail, timeout)",
    ["type", "outcome"],
)
DNS_CACHE = Counter(
    P + "dns_cache_total",
    "DNS cache lookups by result (hit, miss)",
    ["result"],
)
DNS_LATENCY = Histogram(
    P + "dns_query_seconds",
    "Time to a DNS answer (cache misses only)",
    ["type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DNSBL_LOOKUPS = Counter(
    P + "dnsbl_lookups_total",
    "DNSBL/DNSWL lookups by configured zone name and result (listed, clean, error, timeout)",
    ["zone", "result"],
)
DNSBL_ZONE_HEALTHY = Gauge(
    P + "dnsbl_zone_healthy",
    "1 while the zone passes its RFC 5782 test-entry check; unhealthy zones are skipped",
    ["zone"],
    multiprocess_mode="livemin",
)
RATELIMIT_HITS = Counter(
    P + "ratelimit_hits_total",
    "Requests refused by a rate or concurrency limit, by the limit's configured name",
    ["limit"],
)
RATELIMIT_CONFIGURED = Gauge(
    P + "ratelimit_configured_per_second",
    "The configured rate of each limit, in units per second",
    ["limit"],
    multiprocess_mode="max",
)
RATELIMIT_STORE_ERRORS = Counter(
    P + "ratelimit_store_errors_total",
    "Rate-limit store (Redis) operations that failed; the policy's action for "
    "ratelimit.unavailable applied (default: allow)",
    ["operation"],
)
REWRITES = Counter(
    P + "rewrites_total",
    "Addresses changed by each rewrite stage (headers: header fields changed)",
    ["stage"],
)
REWRITE_LOOPS = Counter(
    P + "rewrite_loops_total",
    "Virtual alias expansions refused as a loop, too deep or too wide",
)
TLS_SESSIONS = Counter(
    P + "tls_sessions_total",
    "Client sessions by negotiated TLS version at their end ('none': plaintext throughout)",
    ["listener", "version"],
)
TLS_HANDSHAKE_FAILURES = Counter(
    P + "tls_handshake_failures_total",
    "Client TLS handshakes that failed, by reason",
    ["listener", "reason"],
)
TLS_CERT_EXPIRY = Gauge(
    P + "tls_certificate_expiry_timestamp_seconds",
    "notAfter of each loaded listener certificate (default, sni-N), as a Unix time",
    ["listener", "certificate"],
    # The workers' (the processes that serve and reload); a dead one's file is left out.
    multiprocess_mode="livemin",
)
TLS_CERT_RELOADS = Counter(
    P + "tls_certificate_reloads_total",
    "Certificate file changes picked up (ok) or refused, the old one kept (failed)",
    ["listener", "result"],
)
CHECK_SECONDS = Histogram(
    P + "check_seconds",
    "Time one check took at one stage (DNS waits included)",
    ["check"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
             0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip
STAGE_SECONDS = Histogram(
    P + "stage_seconds",
    "Time all checks of one SMTP stage took together (connect, helo, mail, rcpt, data)",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
             1, 2.5, 5, 10),
)  # fmt: skip
BACKEND_BREAKER_OPEN = Gauge(
    P + "backend_circuit_open",
    "1 while a backend target's circuit breaker is open (target: its position in backend.url)",
    ["target"],
    multiprocess_mode="livemax",
)
BACKEND_POOL_IDLE = Gauge(
    P + "backend_pool_idle_sessions",
    "Backend sessions connected and greeted ahead of need, per target (spares: each goes"
    " to one client session)",
    ["target"],
    multiprocess_mode="livesum",
)
BACKEND_SESSIONS_OPEN = Gauge(
    P + "backend_sessions_open",
    "Backend sessions open (in use, idle or connecting) per target; backend.max_sessions caps it",
    ["target"],
    multiprocess_mode="livesum",
)
BACKEND_SESSION_WAITERS = Gauge(
    P + "backend_session_waiters",
    "Transactions waiting for a backend session at backend.max_sessions, per target",
    ["target"],
    multiprocess_mode="livesum",
)
# Content scanners (checks/scanner.py: clamav, rspamd). `scanner` is the check's
# name, a closed set; what a scanner found (a signature name) is in the logs only.
SCAN_SECONDS = Histogram(
    P + "scan_seconds",
    "Time a content scanner took for one message: connecting, sending it and its answer"
    " (not the wait for a free slot under max_concurrent: that is in check_seconds)",
    ["scanner"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SCANNER_ERRORS = Counter(
    P + "scanner_errors_total",
    "Content scans that gave no verdict, by scanner and kind (unavailable: refused or"
    " cut off; timeout: no answer by the deadline; protocol: an answer not understood);"
    " the policy's action for <scanner>.unavailable or <scanner>.timeout applied",
    ["scanner", "kind"],
)
SCANNER_CONNECTIONS = Counter(
    P + "scanner_connections_total",
    "Connections to a content scanner by result (opened: a new one; reused: a kept one)",
    ["scanner", "result"],
)
# Greylisting (checks/greylist.py): each triplet judged, by how. new and early were
# deferred; capped: deferred and not recorded, its client network holding
# max_pending_per_network pending triplets, none yet `delay` old (a flood of new
# triplets); passed: a retry in time, now whitelisted; whitelisted: a known triplet;
# network: its client network is auto-whitelisted; exempt: skipped by the policy
# (an authenticated sender of exempt_domains, Rspamd's verdict); unavailable: the
# Redis store did not answer (greylist.unavailable's action applied).
GREYLIST_TRIPLETS = Counter(
    P + "greylist_triplets_total",
    "Greylist triplets judged, by result (new, early: deferred; capped: deferred,"
    " not recorded, its network at its cap of pending triplets; passed, whitelisted,"
    " network: passed; exempt: skipped by the policy; unavailable: no store)",
    ["result"],
)
# DMARC aggregate reports (gateway/dmarcreports/). Recorded: evaluations counted
# into a report row. Dropped, by reason: buffer_full (dmarc_reports.max_pending
# between flushes), store_full (max_rows of an interval), domain_full (its
# organisational domain's share: max_rows_per_domain in the store, a tenth of the
# buffer), store_error (the store failed a flush), domain_limit (past max_domains
# of an interval), bad_domain (a policy or From domain that is no host name),
# bad_address (a source that is no IP address), report_error (a report that failed
# to build; logged). Reports by result: sent, or why a report was not sent to a
# destination: unauthorized (no _report._dmarc record for an outside destination),
# temperror (that lookup failed: kept for a retry), too_big (the rua size limit or
# max_report_size), refused (a 5xx from the relay), relay_error (relay unreachable
# or a 4xx: kept for a retry), dropped (retries used up).
DMARC_EVALUATIONS_RECORDED = Counter(
    P + "dmarc_evaluations_recorded_total",
    "DMARC evaluations counted for aggregate reports (dmarc_reports.enabled)",
)
DMARC_EVALUATIONS_DROPPED = Counter(
    P + "dmarc_evaluations_dropped_total",
    "DMARC evaluations left out of aggregate reports, by reason (buffer_full, store_full,"
    " domain_full, store_error, domain_limit, bad_domain, bad_address, report_error)",
    ["reason"],
)
DMARC_REPORTS = Counter(
    P + "dmarc_reports_total",
    "DMARC aggregate report messages by result (sent; unauthorized, temperror, too_big,"
    " refused, relay_error, dropped: not sent, by why)",
    ["result"],
)
