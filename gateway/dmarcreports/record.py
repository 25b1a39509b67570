"""What one message adds to the aggregate reports, and the in-memory buffer that
takes it on the hot path.

At the end of a transaction whose DMARC evaluation found a record asking for
aggregate reports (rua=mailto:...), one row is counted: the client's address, what
the gateway did with the message, the DMARC-aligned results, the identifiers and
the raw SPF and DKIM results (RFC 7489 Appendix C). Equal rows are one row with a
count, here already: a sender's thousand messages are one dictionary entry.

Recording costs a dictionary update on the event loop; the buffer goes to the store
(disk or Redis) from a task every `flush_interval` seconds, the disk work in a
thread. Both the buffer and the store are bounded, overall and per organisational
domain (`org_of`): one sender's unique rows fill its own share, never the room of
every other domain. What does not fit is dropped and counted, in the metric
(smtp_gateway_dmarc_evaluations_dropped_total) and for its domain, whose report
says how many of its messages were not recorded.

The policy domain and the From domain become the report mail's Subject, file name
and Message-ID: a row is kept only when both are host names (`hostname`); the
others are counted as dropped (bad_domain).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from gateway import metrics
from gateway.checks.dmarc import psl
from gateway.context import Context
from gateway.vocab import Action

if TYPE_CHECKING:
    from gateway.dmarcreports.store import ReportStore

log = logging.getLogger("gateway.dmarcreports")

# Values taken from a message are bounded before they are kept: a domain name is
# at most 253 octets, a selector a label or a few.
MAX_NAME = 253
MAX_DKIM = 8  # signatures reported per row (a message may carry more; they repeat)

# DKIM results an aggregate report may carry (RFC 7489 Appendix C, DKIMResultType).
DKIM_RESULTS = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"})
SPF_RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"})


# A host name (RFC 1123 2.1, RFC 5890's A-labels included): letters, digits and
# hyphens, no hyphen first or last, 1 to 63 octets a label, 253 in all.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# The same with underscores, which config.py allows in our own (internal) names.
_LABEL_ = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME_ = re.compile(rf"{_LABEL_}(?:\.{_LABEL_})*")


@functools.lru_cache(maxsize=4096)
def hostname(name: str, underscore: bool = False) -> bool:
    """Whether `name` is a host name: the only names that go into a report mail's
    header fields and file name (a DNS name may hold "/", controls, any octet).
    Cached: asked twice per message, of the same few domains."""
    pattern = _HOSTNAME_ if underscore else _HOSTNAME
    return len(name) <= MAX_NAME and pattern.fullmatch(name) is not None


@functools.lru_cache(maxsize=4096)
def org_of(domain: str) -> str:
    """The organisational domain of a policy domain by the Public Suffix List
    (offline): whose share of the buffer and the store its rows take. Per policy
    domain would not do: a wildcard TXT record under one registered domain makes
    any number of policy domains."""
    return psl().privatesuffix(domain) or domain


class Unreportable(Exception):
    """A transaction whose row cannot go into a report; `reason` is the dropped
    counter's label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Policy(NamedTuple):
    """The published record's values that a report shows (policy_published), and
    its rua as written. A report covers one (domain, Policy): a record changed
    during the interval makes a second report, each true to what applied."""

    p: str
    sp: str
    adkim: str
    aspf: str
    pct: int
    fo: str
    rua: str


class Row(NamedTuple):
    """One record of a report, less its count."""

    source_ip: str
    disposition: str  # what the gateway did: none, quarantine, reject
    dkim: str  # DMARC-aligned DKIM: pass, fail
    spf: str  # DMARC-aligned SPF: pass, fail
    reasons: tuple[tuple[str, str], ...]  # (PolicyOverrideType, comment)
    header_from: str
    envelope_from: str
    envelope_to: str  # "" when the recipients' domains differ
    dkim_results: tuple[tuple[str, str, str], ...]  # (d=, s=, result)
    spf_result: tuple[str, str, str]  # (domain, scope: mfrom or helo, result)


class Key(NamedTuple):
    interval: int  # the interval's start, UTC seconds
    domain: str  # the policy domain: where the record was found, the report's domain
    policy: Policy
    row: Row


def interval_start(now: float, interval: int) -> int:
    """The start of the UTC-aligned interval holding `now` (the epoch is midnight
    UTC, and an interval divides a day)."""
    t = int(now)
    return t - t % interval


def disposition_of(action: Action, outcome: str, quarantined: bool) -> str | None:
    """What the gateway did with the message, as DMARC names it; None for a
    transaction with no fate yet.

    Rejected (by a check or by the backend): reject. Delivered under the quarantine
    action (a header, or redirected): quarantine. Delivered, tagged or not: none;
    a tag is a header field for the user's filters, the message is delivered as any
    other. Deferred (tempfail) or aborted: not recorded at all: the client will
    retry, and the retry's fate is the one reported, so a message counts once.
    """
    if outcome == "rejected":
        return "reject"
    if outcome != "delivered":
        return None
    return "quarantine" if quarantined or action is Action.QUARANTINE else "none"


def _name(value: str) -> str:
    return value[:MAX_NAME]


def source_ip(ip: str) -> str:
    """The client's address as a row keeps it: without an IPv6 zone index
    ("fe80::1%eth0": an interface of this host, not the sender). Not parsed here (11
    µs for IPv6, on every message): a row whose source is no address is left out
    when its report is made (feedback.py), counted, never the report."""
    return ip.partition("%")[0]


def key_of(ctx: Context, action: Action, outcome: str, now: float, interval: int) -> Key | None:
    """The row this transaction adds, or None (no DMARC record asking for reports,
    no result to report, no fate yet). Raises Unreportable for a policy or From
    domain that is no host name."""
    out = ctx.facts.dmarc
    if out is None or out.published is None or out.result not in ("pass", "fail"):
        return None
    pub = out.published
    if "mailto:" not in pub.rua.lower():
        return None  # no aggregate report asked (RFC 7489 B.3.1): nothing to keep
    disposition = disposition_of(action, outcome, ctx.quarantine)
    if disposition is None:
        return None
    if not hostname(pub.domain) or not hostname(out.from_domain):
        raise Unreportable("bad_domain")
    ip = source_ip(ctx.client_ip)
    reasons: list[tuple[str, str]] = []
    for o in out.overrides:
        if o == "testing":
            reasons.append(("other", "testing (t=y)"))
        else:
            reasons.append((o, ""))
    if disposition != out.disposition:
        # The gateway's own policy did otherwise than DMARC asked: monitoring, a tag
        # instead of a refusal, or another check's refusal of a passing message.
        reasons.append(("local_policy", ""))
    sender = ctx.mail_from
    null = sender is None or sender.is_null
    envelope_from = _name((ctx.helo or "") if null else sender.domain)  # type: ignore[union-attr]
    spf = ctx.facts.spf
    if spf is not None and spf.result in SPF_RESULTS:
        spf_result = (_name(spf.domain), "helo" if null else "mfrom", spf.result)
    else:
        spf_result = (envelope_from, "helo" if null else "mfrom", "none")
    domains = {r.domain for r in ctx.recipients}
    dkim = tuple(
        (_name(s.domain), _name(s.selector), s.result if s.result in DKIM_RESULTS else "neutral")
        for s in ctx.facts.dkim[:MAX_DKIM]
    )
    row = Row(
        ip,
        disposition,
        "pass" if out.dkim_aligned else "fail",
        "pass" if out.spf_aligned else "fail",
        tuple(reasons),
        _name(out.from_domain),
        envelope_from,
        _name(domains.pop()) if len(domains) == 1 else "",
        dkim,
        spf_result,
    )
    policy = Policy(pub.p, pub.sp, pub.adkim, pub.aspf, pub.pct, pub.fo, pub.rua)
    return Key(interval_start(now, interval), pub.domain, policy, row)


# -- the stored form ------------------------------------------------------------------


def dump(value: Policy | Row) -> str:
    """Compact JSON of a Policy or Row (a list, in field order: the same row is the
    same text, which the stores count under)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def policy_of(text: str) -> Policy:
    p = json.loads(text)
    return Policy(str(p[0]), str(p[1]), str(p[2]), str(p[3]), int(p[4]), str(p[5]), str(p[6]))


def row_of(text: str) -> Row:
    r: list[Any] = json.loads(text)
    return Row(
        str(r[0]),
        str(r[1]),
        str(r[2]),
        str(r[3]),
        tuple((str(a), str(b)) for a, b in r[4]),
        str(r[5]),
        str(r[6]),
        str(r[7]),
        tuple((str(a), str(b), str(c)) for a, b, c in r[8]),
        (str(r[9][0]), str(r[9][1]), str(r[9][2])),
    )


# -- the buffer -------------------------------------------------------------------------

_RECORDED = metrics.child(metrics.DMARC_EVALUATIONS_RECORDED)

# Lost evaluations by (interval, policy domain): what a domain's report says was
# not recorded.
Lost = dict[tuple[int, str], int]


def note_lost(lost: Lost, interval: int, domain: str, n: int, bound: int) -> None:
    """Add `n` to a domain's lost count; a new domain past `bound` entries is
    counted by the metric only (many domains at once: the map stays bounded)."""
    key = (interval, domain)
    have = lost.get(key)
    if have is not None:
        lost[key] = have + n
    elif len(lost) < bound:
        lost[key] = n


class Recorder:
    """Counts rows in memory (on the loop); `flush` hands them to the store.

    Bounded overall (`max_pending` distinct rows) and per organisational domain
    (`per_domain`): past its share, a domain's new rows are dropped and counted for
    that domain, and the others still find room."""

    def __init__(
        self,
        store: ReportStore,
        interval: int,
        max_pending: int,
        flush_interval: float,
        clock: Callable[[], float] = time.time,
        per_domain: int | None = None,
    ) -> None:
        self.store = store
        self.interval = interval
        self.max_pending = max_pending
        # None: no share but the whole buffer (service.buffer_share gives a tenth).
        self.per_domain = max_pending if per_domain is None else per_domain
        self.flush_interval = flush_interval
        self.clock = clock
        self.pending: dict[Key, int] = {}
        self.held: dict[str, int] = {}  # distinct pending rows by organisational domain
        self.lost: Lost = {}
        self._dropped = metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "buffer_full")
        self._domain_full = metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "domain_full")
        self._bad = {"bad_domain": metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "bad_domain")}

    def note(self, ctx: Context, action: Action, outcome: str) -> None:
        """At the end of a transaction whose DMARC check ran: one more of its row."""
        try:
            key = key_of(ctx, action, outcome, self.clock(), self.interval)
        except Unreportable as e:
            self._bad[e.reason].inc()
            return
        if key is None:
            return
        pending = self.pending
        n = pending.get(key)
        if n is None:
            if len(pending) >= self.max_pending:
                self._dropped.inc()
                note_lost(self.lost, key.interval, key.domain, 1, self.max_pending)
                return
            org = org_of(key.domain)
            held = self.held.get(org, 0)
            if held >= self.per_domain:
                self._domain_full.inc()
                note_lost(self.lost, key.interval, key.domain, 1, self.max_pending)
                return
            pending[key] = 1
            self.held[org] = held + 1
        else:
            pending[key] = n + 1
        _RECORDED.inc()

    async def flush(self) -> None:
        """Everything buffered so far, to the store; what the store cannot keep is
        counted as dropped there. A store that fails keeps nothing of this batch:
        it is counted as dropped, never retried into a growing buffer."""
        if not self.pending and not self.lost:
            return
        batch, self.pending = self.pending, {}
        lost, self.lost = self.lost, {}
        self.held = {}
        try:
            await self.store.add(batch, lost)
        except Exception as e:
            metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "store_error").inc(sum(batch.values()))
            log.warning("DMARC report store: %d evaluations not kept: %s", len(batch), e)

    async def run(self) -> None:
        """Flush every `flush_interval` seconds until cancelled; whoever cancels it
        flushes once more (App.drain)."""
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()
