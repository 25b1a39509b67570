"""What one transaction adds to the reports, and the buffer on the hot path."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway import metrics
from gateway.address import NULL
from gateway.context import Context
from gateway.dmarcreports.record import (
    Key,
    Lost,
    Recorder,
    Unreportable,
    disposition_of,
    dump,
    hostname,
    interval_start,
    key_of,
    policy_of,
    row_of,
)
from gateway.dmarcreports.store import Group, Outgoing
from gateway.vocab import Action
from tests.unit.dmarcreports.helpers import POLICY, context, row

NOW = 1_700_000_123.5
DAY = 86400


@pytest.mark.parametrize(
    ("action", "outcome", "quarantined", "expected"),
    [
        (Action.REJECT, "rejected", False, "reject"),
        (Action.ACCEPT, "rejected", False, "reject"),  # the backend refused it
        (Action.QUARANTINE, "delivered", True, "quarantine"),
        (Action.TAG, "delivered", True, "quarantine"),  # a quarantine symbol at RCPT
        (Action.TAG, "delivered", False, "none"),
        (Action.ACCEPT, "delivered", False, "none"),
        (Action.TEMPFAIL, "tempfailed", False, None),  # its retry is what counts
        (Action.ACCEPT, "aborted", False, None),
    ],
)
def test_the_disposition_is_what_the_gateway_did(
    action: Action, outcome: str, quarantined: bool, expected: str | None
) -> None:
    assert disposition_of(action, outcome, quarantined) == expected


def test_intervals_align_to_utc_midnight() -> None:
    start = interval_start(NOW, DAY)
    assert start % DAY == 0 and start <= NOW < start + DAY
    assert interval_start(NOW, 3600) % 3600 == 0


def test_a_passing_message_becomes_one_row() -> None:
    key = key_of(context(), Action.ACCEPT, "delivered", NOW, DAY)
    assert key is not None
    assert key.interval == interval_start(NOW, DAY) and key.domain == "own.test"
    assert key.policy == POLICY
    assert key.row == row()


def test_nothing_is_kept_for_a_domain_that_asks_no_reports_or_a_result_without_a_policy() -> None:
    assert key_of(context(rua=""), Action.ACCEPT, "delivered", NOW, DAY) is None
    assert key_of(context(rua="https://x.test/r"), Action.ACCEPT, "delivered", NOW, DAY) is None
    for result in ("none", "temperror", "permerror"):
        assert key_of(context(result), Action.ACCEPT, "delivered", NOW, DAY) is None
    assert key_of(context(), Action.TEMPFAIL, "tempfailed", NOW, DAY) is None


def test_reasons_say_why_the_disposition_differs_from_the_policy() -> None:
    # DMARC asked for reject; the monitoring policy delivered it: local_policy.
    ctx = context("fail", disposition="reject", dkim_aligned=False)
    key = key_of(ctx, Action.TAG, "delivered", NOW, DAY)
    assert key is not None and key.row.reasons == (("local_policy", ""),)
    assert (key.row.dkim, key.row.spf) == ("fail", "fail")
    sampled = context("fail", disposition="quarantine", overrides=("sampled_out", "testing"))
    key = key_of(sampled, Action.QUARANTINE, "delivered", NOW, DAY)
    assert key is not None
    assert key.row.reasons == (("sampled_out", ""), ("other", "testing (t=y)"))


def test_identifiers_of_a_bounce_and_of_recipients_in_several_domains() -> None:
    ctx = context(sender=NULL, recipients=("a.test", "b.test"))
    key = key_of(ctx, Action.ACCEPT, "delivered", NOW, DAY)
    assert key is not None
    assert key.row.envelope_from == "mx.own.test"  # the HELO name (RFC 7489 gives no other)
    assert key.row.spf_result == ("own.test", "helo", "softfail")
    assert key.row.envelope_to == ""  # more than one domain: none is reported


def test_values_from_the_message_are_bounded() -> None:
    ctx = context()
    ctx.facts.dkim = tuple(ctx.facts.dkim * 50)
    key = key_of(ctx, Action.ACCEPT, "delivered", NOW, DAY)
    assert key is not None and len(key.row.dkim_results) == 8


def test_stored_form_round_trips() -> None:
    assert row_of(dump(row())) == row()
    assert policy_of(dump(POLICY)) == POLICY


class ListStore:
    """The store as the recorder sees it: `add` only."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[dict[Key, int]] = []
        self.lost: list[Lost] = []
        self.fail = fail

    async def add(self, batch: dict[Key, int], lost: Lost | None = None) -> None:
        if self.fail:
            raise OSError("disk full")
        self.batches.append(batch)
        self.lost.append(lost or {})

    # The rest of the interface: never called by the recorder.
    async def intervals(self) -> list[int]: ...  # type: ignore[empty-body]
    async def groups(self, interval: int) -> list[Group]: ...  # type: ignore[empty-body]
    async def outbox(self) -> list[Outgoing]: ...  # type: ignore[empty-body]


def _counter(metric: object, *labels: str) -> float:
    metrics.flush()
    return float(metric.labels(*labels)._value.get() if labels else metric._value.get())  # type: ignore[attr-defined]


def test_equal_rows_are_one_entry_with_a_count_and_a_flush_hands_them_over() -> None:
    store = ListStore()
    rec = Recorder(store, DAY, 100, 1.0, clock=lambda: NOW)  # type: ignore[arg-type]
    before = _counter(metrics.DMARC_EVALUATIONS_RECORDED)
    for _ in range(3):
        rec.note(context(), Action.ACCEPT, "delivered")
    rec.note(context(), Action.REJECT, "rejected")
    rec.note(context(rua=""), Action.ACCEPT, "delivered")  # not recorded
    assert sorted(rec.pending.values()) == [1, 3]
    assert _counter(metrics.DMARC_EVALUATIONS_RECORDED) - before == 4
    asyncio.run(rec.flush())
    assert rec.pending == {} and len(store.batches) == 1
    assert sorted(store.batches[0].values()) == [1, 3]
    asyncio.run(rec.flush())  # nothing buffered: nothing handed over
    assert len(store.batches) == 1


def test_the_buffer_is_bounded_and_what_does_not_fit_is_counted() -> None:
    rec = Recorder(ListStore(), DAY, 2, 1.0, clock=lambda: NOW)  # type: ignore[arg-type]
    before = _counter(metrics.DMARC_EVALUATIONS_DROPPED, "buffer_full")
    for i in range(5):
        ctx = context()
        ctx.client_ip = f"192.0.2.{i}"
        rec.note(ctx, Action.ACCEPT, "delivered")
    held = context()
    held.client_ip = "192.0.2.0"
    rec.note(held, Action.ACCEPT, "delivered")  # a row it holds still counts
    assert len(rec.pending) == 2 and sorted(rec.pending.values()) == [1, 2]
    assert _counter(metrics.DMARC_EVALUATIONS_DROPPED, "buffer_full") - before == 3


def test_a_failing_store_loses_the_batch_counted_and_never_grows_the_buffer() -> None:
    rec = Recorder(ListStore(fail=True), DAY, 10, 1.0, clock=lambda: NOW)  # type: ignore[arg-type]
    before = _counter(metrics.DMARC_EVALUATIONS_DROPPED, "store_error")
    rec.note(context(), Action.ACCEPT, "delivered")
    rec.note(context(), Action.ACCEPT, "delivered")
    asyncio.run(rec.flush())
    assert rec.pending == {}
    assert _counter(metrics.DMARC_EVALUATIONS_DROPPED, "store_error") - before == 2


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("own.test", True),
        ("xn--bcher-kva.example", True),  # an A-label
        ("a-b.9x.test", True),
        ("x/y.attacker.test", False),
        ("x\x01y.attacker.test", False),
        ("x\x7fy.attacker.test", False),
        ("=?utf-8?b?SGk=?=.attacker.test", False),
        ("x&y'z.attacker.test", False),
        ("-x.test", False),
        ("x-.test", False),
        ("a..test", False),
        ("b\u00fccher.example", False),  # a U-label: DMARC works on A-labels
        ("a" * 64 + ".test", False),
        (".".join(["a" * 63] * 4), False),  # 255 octets
        ("", False),
    ],
)
def test_host_names_are_letters_digits_and_hyphens_in_bounded_labels(name: str, ok: bool) -> None:
    assert hostname(name) is ok


def domains(ctx: Context, policy: str, from_domain: str | None = None) -> Context:
    """`ctx` with its DMARC outcome's policy domain (and From domain) replaced."""
    out = ctx.facts.dmarc
    assert out is not None and out.published is not None
    ctx.facts.dmarc = dataclasses.replace(
        out,
        published=dataclasses.replace(out.published, domain=policy),
        from_domain=from_domain or policy,
    )
    return ctx


def test_a_domain_that_is_no_host_name_is_not_recorded_and_is_counted() -> None:
    rec = Recorder(ListStore(), DAY, 100, 1.0, clock=lambda: NOW)  # type: ignore[arg-type]
    before = _counter(metrics.DMARC_EVALUATIONS_DROPPED, "bad_domain")
    policy_domain = domains(context(), "x/y.attacker.test")
    from_domain = domains(context(), "own.test", "x\x01y.own.test")
    for ctx in (policy_domain, from_domain):
        with pytest.raises(Unreportable):
            key_of(ctx, Action.ACCEPT, "delivered", NOW, DAY)
        rec.note(ctx, Action.ACCEPT, "delivered")
    assert rec.pending == {}
    assert _counter(metrics.DMARC_EVALUATIONS_DROPPED, "bad_domain") - before == 2
    rec.note(context(), Action.ACCEPT, "delivered")  # a host name is recorded
    assert len(rec.pending) == 1


def test_a_zone_index_is_left_off_the_source() -> None:
    """It names an interface of this host, not the sender: fe80::1 from eth0 and
    from eth1 is one sender, one row (feedback.py leaves out what is no address)."""
    ctx = context()
    ctx.client_ip = "fe80::1%eth0"
    key = key_of(ctx, Action.ACCEPT, "delivered", NOW, DAY)
    assert key is not None and key.row.source_ip == "fe80::1"


def test_the_buffer_gives_each_organisation_a_share_and_keeps_what_it_lost_by_domain() -> None:
    """One sender's unique rows (its subdomains with theirs) fill its own share of
    the buffer; another domain's rows still go in; what was lost goes to the store
    by policy domain, for that domain's report."""
    store = ListStore()
    rec = Recorder(store, DAY, 10, 1.0, clock=lambda: NOW, per_domain=3)  # type: ignore[arg-type]
    before = _counter(metrics.DMARC_EVALUATIONS_DROPPED, "domain_full")
    for i in range(8):
        ctx = context()
        ctx.client_ip = f"192.0.2.{i}"
        domains(ctx, f"s{i % 2}.attacker.test")  # two policy domains, one organisation
        rec.note(ctx, Action.ACCEPT, "delivered")
    for _ in range(4):
        rec.note(context(), Action.ACCEPT, "delivered")  # own.test: one row, four times
    assert sorted(k.domain for k in rec.pending) == [
        "own.test",
        "s0.attacker.test",
        "s0.attacker.test",
        "s1.attacker.test",
    ]
    assert _counter(metrics.DMARC_EVALUATIONS_DROPPED, "domain_full") - before == 5
    interval = interval_start(NOW, DAY)
    assert rec.lost == {(interval, "s0.attacker.test"): 2, (interval, "s1.attacker.test"): 3}
    asyncio.run(rec.flush())
    assert store.lost == [{(interval, "s0.attacker.test"): 2, (interval, "s1.attacker.test"): 3}]
    assert rec.lost == {} and rec.held == {}
