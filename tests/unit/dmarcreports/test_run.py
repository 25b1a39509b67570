"""One reporting run, with a store on disk, a dict resolver and a relay that notes
what it is handed: bounds, authorisation, size limits, retries, the lease."""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import config, metrics
from gateway.dmarcreports import feedback, message
from gateway.dmarcreports.record import Key, Policy, Row
from gateway.dmarcreports.relay import Relay, SendFailed
from gateway.dmarcreports.run import LEASE, Reporter
from gateway.dmarcreports.store import Group, Outgoing, SqliteStore
from tests.support.dmarcschema import validate
from tests.unit.dmarcreports.helpers import POLICY, row
from tests.unit.fakes import TIMEOUT, DictResolver, txt

DAY = 86400
T = 1_700_006_400
AFTER = T + DAY + 600  # the interval and its send delay are over
RELAY = Relay("127.0.0.1", 25, "gw.test", config.BackendTls.NONE, 5.0)


def settings(**reports: Any) -> config.Settings:
    return config.Settings.model_validate(
        {
            "hostname": "gw.test",
            "backend": {"url": "smtp://127.0.0.1:2526"},
            "dmarc_reports": {"enabled": True, "email": "dmarc@gw.test", **reports},
        }
    )


class Relayed:
    """The relay: each hand-over noted; `fail` maps a recipient to the error it gets."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail: dict[str, SendFailed] = {}

    async def __call__(self, relay: Relay, sender: str, rcpt: str, message: bytes) -> str:
        if rcpt in self.fail:
            raise self.fail[rcpt]
        self.sent.append((rcpt, message))
        return "250 ok"


def reporter(
    tmp_path: Path, zone: dict[Any, Any] | None = None, **reports: Any
) -> tuple[Reporter, SqliteStore, Relayed]:
    store = SqliteStore(tmp_path / "dmarc.sqlite", 1000)
    relayed = Relayed()
    r = Reporter(settings(**reports), store, DictResolver(zone or {}), RELAY, sender=relayed)
    return r, store, relayed


def policy(rua: str, p: str = "none") -> Policy:
    return Policy(p, p, "r", "r", 100, "0", rua)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def xml_of(message: bytes) -> ET.Element:
    msg = email.message_from_bytes(message, policy=email.policy.SMTP)
    [part] = list(msg.iter_attachments())  # type: ignore[attr-defined]
    xml = gzip.decompress(part.get_payload(decode=True))
    validate(xml)
    return ET.fromstring(xml)


def count(result: str) -> float:
    metrics.flush()
    return float(metrics.DMARC_REPORTS.labels(result)._value.get())


def test_a_run_sends_each_ended_interval_once_and_leaves_the_current_one(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    run(
        store.add(
            {Key(T, "own.test", POLICY, row()): 4, Key(T + DAY, "own.test", POLICY, row()): 1}
        )
    )
    summary = run(r.run(AFTER))
    assert (summary.reports, summary.sent) == (1, 1)
    [(rcpt, message)] = relayed.sent
    assert rcpt == "dmarc@own.test"
    root = xml_of(message)
    assert root.findtext("record/row/count") == "4"
    assert root.findtext("report_metadata/date_range/end") == str(T + DAY - 1)
    assert run(store.intervals()) == [T + DAY]  # the day in progress stays
    assert run(r.run(AFTER)).reports == 0  # nothing sent twice


def test_an_interval_waits_for_its_send_delay(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path, send_delay=600)
    run(store.add({Key(T, "own.test", POLICY, row()): 1}))
    assert run(r.run(T + DAY + 599)).reports == 0
    assert relayed.sent == []
    assert run(r.run(T + DAY + 600)).reports == 1
    assert len(relayed.sent) == 1


def test_reports_past_max_domains_are_dropped_most_mail_first(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path, max_domains=2)
    run(
        store.add(
            {Key(T, f"d{i}.test", policy(f"mailto:r@d{i}.test"), row()): 10 - i for i in range(4)}
        )
    )
    metrics.flush()
    before = metrics.DMARC_EVALUATIONS_DROPPED.labels("domain_limit")._value.get()
    run(r.run(AFTER))
    assert [rcpt for rcpt, _ in relayed.sent] == ["r@d0.test", "r@d1.test"]
    metrics.flush()
    assert metrics.DMARC_EVALUATIONS_DROPPED.labels("domain_limit")._value.get() - before == 15
    assert run(store.intervals()) == []


def test_records_past_max_records_are_left_out_and_the_report_says_so(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path, max_records=2)
    run(store.add({Key(T, "own.test", POLICY, row(f"192.0.2.{i}")): i + 1 for i in range(5)}))
    run(r.run(AFTER))
    root = xml_of(relayed.sent[0][1])
    assert [e.findtext("row/count") for e in root.findall("record")] == ["5", "4"]
    assert root.findtext("report_metadata/error") == "3 records left out: more than 2"


def test_unauthorized_and_too_big_destinations_get_nothing_the_others_their_report(
    tmp_path: Path,
) -> None:
    zone = {("own.test._report._dmarc.reports.test", "TXT"): txt("v=DMARC1")}
    r, store, relayed = reporter(tmp_path, zone)
    rua = "mailto:a@reports.test,mailto:b@elsewhere.test"
    run(
        store.add(
            {
                Key(T, "own.test", policy(rua), row()): 1,
                Key(T, "small.test", policy("mailto:t@small.test!512"), row()): 1,
            }
        )
    )
    before = (count("unauthorized"), count("too_big"))
    summary = run(r.run(AFTER))
    assert [rcpt for rcpt, _ in relayed.sent] == ["a@reports.test"]
    assert summary.not_sent == {"unauthorized": 1, "too_big": 1}
    assert (count("unauthorized") - before[0], count("too_big") - before[1]) == (1, 1)


def test_max_report_size_caps_every_destination(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path, max_report_size=1024)
    run(store.add({Key(T, "own.test", POLICY, row()): 1}))
    assert run(r.run(AFTER)).not_sent == {"too_big": 1}
    assert relayed.sent == []


def test_a_dns_failure_for_one_domain_does_not_stop_the_others(tmp_path: Path) -> None:
    class Failing(DictResolver):
        async def query(self, name: str, rdtype: str):  # type: ignore[no-untyped-def]
            return TIMEOUT if "broken" in name else await super().query(name, rdtype)

    store = SqliteStore(tmp_path / "dmarc.sqlite", 1000)
    relayed = Relayed()
    r = Reporter(settings(), store, Failing({}), RELAY, sender=relayed)
    run(
        store.add(
            {
                Key(T, "a.test", policy("mailto:r@broken.test"), row()): 5,
                Key(T, "own.test", POLICY, row()): 1,
            }
        )
    )
    assert run(r.run(AFTER)).not_sent == {"temperror": 1}
    assert [rcpt for rcpt, _ in relayed.sent] == ["dmarc@own.test"]


def test_a_temporary_failure_is_retried_at_the_next_runs_then_dropped(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path, retries=2)
    run(store.add({Key(T, "own.test", POLICY, row()): 1}))
    relayed.fail["dmarc@own.test"] = SendFailed("relay_error", "down", temporary=True)
    assert run(r.run(AFTER)).not_sent == {"relay_error": 1}
    assert [o.attempts for o in run(store.outbox())] == [1]
    assert run(r.run(AFTER)).not_sent == {"relay_error": 1}
    assert run(r.run(AFTER)).not_sent == {"dropped": 1}
    assert run(store.outbox()) == []
    # And one that gets through on a retry is the report first built.
    run(store.add({Key(T, "own.test", POLICY, row("192.0.2.99")): 1}))
    run(r.run(AFTER))
    del relayed.fail["dmarc@own.test"]
    assert run(r.run(AFTER)).sent == 1
    assert xml_of(relayed.sent[0][1]).findtext("record/row/source_ip") == "192.0.2.99"


def test_a_permanent_refusal_is_not_retried(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    run(store.add({Key(T, "own.test", POLICY, row()): 1}))
    relayed.fail["dmarc@own.test"] = SendFailed("refused", "550 no", temporary=False)
    assert run(r.run(AFTER)).not_sent == {"refused": 1}
    assert run(store.outbox()) == []


def test_a_run_while_another_holds_the_lease_does_nothing(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    run(store.add({Key(T, "own.test", POLICY, row()): 1}))
    assert run(store.lease(LEASE, "someone-else", 60))
    summary = run(r.run(AFTER))
    assert summary.skipped and relayed.sent == []
    assert run(store.intervals()) == [T]


def test_a_dry_run_prints_and_changes_nothing(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    run(store.add({Key(T, "own.test", POLICY, row()): 1}))
    lines: list[str] = []
    summary = run(r.run(AFTER, dry_run=True, out=lines.append))
    assert summary.reports == 1 and relayed.sent == []
    assert any(
        line.startswith("#   to dmarc@own.test: would send gw.test!own.test!") for line in lines
    )
    validate(lines[-1].encode())  # the report itself
    assert run(store.intervals()) == [T]
    assert run(r.run(AFTER)).sent == 1


def test_a_run_that_loses_its_lease_stops_before_the_next_report(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    run(
        store.add(
            {
                Key(T, "a.test", policy("mailto:r@a.test"), row()): 2,
                Key(T, "b.test", policy("mailto:r@b.test"), row()): 1,
            }
        )
    )
    taken = store.lease

    async def lease(name: str, holder: str, ttl: float) -> bool:
        if relayed.sent:  # after the first report another process took it over
            return False
        return await taken(name, holder, ttl)

    store.lease = lease  # type: ignore[method-assign]
    run(r.run(AFTER))
    assert [rcpt for rcpt, _ in relayed.sent] == ["r@a.test"]
    assert [g.domain for g in run(store.groups(T))] == ["b.test"]  # left to the holder


def dropped(reason: str) -> float:
    metrics.flush()
    return float(metrics.DMARC_EVALUATIONS_DROPPED.labels(reason)._value.get())


def test_the_report_is_built_gzipped_and_composed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a report is made the loop that serves mail keeps running: each step
    asks the loop to run a callback and waits for it, which it could never see
    done if it were running on the loop itself."""
    r, store, relayed = reporter(tmp_path)
    run(store.add({Key(T, "own.test", POLICY, row()): 1}))
    ran: dict[str, bool] = {}

    def off_loop(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any) -> Any:
            done = threading.Event()
            loop.call_soon_threadsafe(done.set)
            ran[name] = done.wait(5)
            return fn(*args)

        return step

    monkeypatch.setattr(feedback, "report", off_loop("build", feedback.report))
    monkeypatch.setattr(message, "compose", off_loop("compose", message.compose))

    async def go() -> Any:
        nonlocal loop
        loop = asyncio.get_running_loop()
        return await r.run(AFTER)

    loop: asyncio.AbstractEventLoop
    assert run(go()).sent == 1
    assert ran == {"build": True, "compose": True}
    validate(gzip.decompress(part_of(relayed.sent[0][1])))


def part_of(message_bytes: bytes) -> bytes:
    msg = email.message_from_bytes(message_bytes, policy=email.policy.SMTP)
    [part] = list(msg.iter_attachments())  # type: ignore[attr-defined]
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


def test_a_report_larger_than_max_report_size_is_cut_to_it_and_says_so(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path, max_report_size=20_000)
    run(store.add({Key(T, "own.test", POLICY, row(f"2001:db8::{i:x}")): 1 for i in range(100)}))
    assert run(r.run(AFTER)).sent == 1
    root = xml_of(relayed.sent[0][1])
    records = len(root.findall("record"))
    assert 10 < records < 100
    assert root.findtext("report_metadata/error") == (
        f"{100 - records} records left out: the report's size limit"
    )


def test_a_report_too_big_for_every_destination_is_not_built_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    making = feedback.report

    def report(*args: Any) -> feedback.Report:
        asked.append(args[-1])
        return making(*args)

    monkeypatch.setattr(feedback, "report", report)
    r, store, relayed = reporter(tmp_path)
    rua = "mailto:a@own.test!4k,mailto:b@own.test!8k"
    run(
        store.add(
            {Key(T, "own.test", policy(rua), row(f"2001:db8::{i:x}")): 1 for i in range(3000)}
        )
    )
    assert run(r.run(AFTER)).not_sent == {"too_big": 2}
    assert asked == [8192 * 3 // 4]  # the largest limit: its base64 alone would pass it
    assert relayed.sent == []


def test_nothing_is_built_for_a_report_no_destination_may_receive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def report(*args: Any) -> feedback.Report:
        raise AssertionError("built")

    monkeypatch.setattr(feedback, "report", report)
    r, store, relayed = reporter(tmp_path)
    run(store.add({Key(T, "own.test", policy("mailto:r@elsewhere.test"), row()): 1}))
    before = dropped("report_error")
    assert run(r.run(AFTER)).not_sent == {"unauthorized": 1}
    assert relayed.sent == [] and dropped("report_error") == before


def test_max_domains_ranks_domains_by_all_their_mail_not_group_by_group(tmp_path: Path) -> None:
    """A domain whose record text changes all day has many small groups: together
    they are its mail, and one rank."""
    r, store, relayed = reporter(tmp_path, max_domains=1)
    batch = {
        Key(T, "own.test", policy(f"mailto:r{i}@own.test"), row()): 3 for i in range(5)
    }  # 15 messages in five groups
    batch[Key(T, "b.test", policy("mailto:r@b.test"), row())] = 10
    run(store.add(batch))
    before = dropped("domain_limit")
    run(r.run(AFTER))
    assert sorted(rcpt for rcpt, _ in relayed.sent) == [f"r{i}@own.test" for i in range(5)]
    assert dropped("domain_limit") - before == 10


def test_each_report_says_how_many_of_its_own_domains_messages_were_lost(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    changed = policy("mailto:dmarc@own.test", "none")  # POLICY is p=reject
    run(
        store.add(
            {
                Key(T, "own.test", POLICY, row()): 5,
                Key(T, "own.test", changed, row()): 1,
                Key(T, "b.test", policy("mailto:r@b.test"), row()): 1,
            },
            {(T, "own.test"): 7},
        )
    )
    run(r.run(AFTER))
    errors = {
        (rcpt, xml_of(m).findtext("policy_published/p")): [
            e.text for e in xml_of(m).findall("report_metadata/error")
        ]
        for rcpt, m in relayed.sent
    }
    assert errors == {
        ("dmarc@own.test", "reject"): [
            "7 messages of this domain were not recorded (limits reached)"
        ],
        ("dmarc@own.test", "none"): [],  # the domain's second report: said once
        ("r@b.test", "none"): [],
    }
    assert run(store.dropped(T)) == 0  # the interval is done


def test_a_zone_index_in_a_source_never_costs_the_domain_its_report(tmp_path: Path) -> None:
    """The reviewer's case: feedback.report_ip raised on "fe80::1%eth0" and the
    whole group's rows were deleted, nothing sent."""
    r, store, relayed = reporter(tmp_path)
    run(
        store.add(
            {
                Key(T, "own.test", POLICY, row()): 500,
                Key(T, "own.test", POLICY, row("fe80::1%eth0")): 1,
            }
        )
    )
    assert run(r.run(AFTER)).sent == 1
    root = xml_of(relayed.sent[0][1])
    assert [e.findtext("row/source_ip") for e in root.findall("record")] == [
        "192.0.2.7",
        "fe80:0:0:0:0:0:0:1",
    ]


def test_a_source_that_is_no_address_costs_its_row_counted_not_the_report(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    run(store.add({Key(T, "own.test", POLICY, row()): 5, Key(T, "own.test", POLICY, row("x")): 2}))
    before = dropped("bad_address")
    assert run(r.run(AFTER)).sent == 1
    root = xml_of(relayed.sent[0][1])
    assert len(root.findall("record")) == 1
    assert root.findtext("report_metadata/error") == (
        "1 records left out: the source is not an IP address"
    )
    assert dropped("bad_address") - before == 2


def test_a_report_that_fails_to_build_is_counted_and_logged_and_the_others_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    making = feedback.report

    def report(meta: feedback.Metadata, domain: str, *args: Any) -> feedback.Report:
        if domain == "a.test":
            raise RuntimeError("a bug")
        return making(meta, domain, *args)

    monkeypatch.setattr(feedback, "report", report)
    r, store, relayed = reporter(tmp_path)
    run(
        store.add(
            {
                Key(T, "a.test", policy("mailto:r@a.test"), row()): 4,
                Key(T, "own.test", POLICY, row()): 1,
            }
        )
    )
    before = dropped("report_error")
    run(r.run(AFTER))
    assert [rcpt for rcpt, _ in relayed.sent] == ["dmarc@own.test"]
    assert dropped("report_error") - before == 4
    assert "DMARC report for a.test failed" in caplog.text
    assert run(store.intervals()) == []


def test_rows_the_store_could_not_read_stay_for_the_next_run(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    run(
        store.add(
            {
                Key(T, "own.test", POLICY, row()): 3,
                Key(T, "b.test", policy("mailto:r@b.test"), row()): 1,
            },
            {(T, "own.test"): 2},
        )
    )
    reading = store.rows
    failing = {"own.test"}

    async def rows(group: Group, limit: int) -> list[tuple[Row, int]]:
        if group.domain in failing:
            raise OSError("disk I/O error")
        return await reading(group, limit)

    store.rows = rows  # type: ignore[method-assign]
    run(r.run(AFTER))
    assert [rcpt for rcpt, _ in relayed.sent] == ["r@b.test"]
    assert [g.domain for g in run(store.groups(T))] == ["own.test"]
    failing.clear()
    run(r.run(AFTER))
    assert [rcpt for rcpt, _ in relayed.sent][1:] == ["dmarc@own.test"]
    root = xml_of(relayed.sent[1][1])
    assert root.findtext("record/row/count") == "3"
    assert [e.text for e in root.findall("report_metadata/error")] == [
        "2 messages of this domain were not recorded (limits reached)"
    ]


def test_a_stored_domain_that_is_no_host_name_is_never_mailed(tmp_path: Path) -> None:
    """Rows recorded before domains were checked: dropped, counted, never a report."""
    r, store, relayed = reporter(tmp_path)
    run(store.add({Key(T, "x/y.attacker.test", policy("mailto:r@attacker.test"), row()): 3}))
    before = dropped("bad_domain")
    summary = run(r.run(AFTER))
    assert (summary.reports, relayed.sent) == (0, [])
    assert dropped("bad_domain") - before == 3
    assert run(store.intervals()) == []


def test_a_temperror_on_the_authorisation_is_retried_at_the_next_run(tmp_path: Path) -> None:
    class Flaky(DictResolver):
        down = True

        async def query(self, name: str, rdtype: str):  # type: ignore[no-untyped-def]
            return TIMEOUT if self.down else await super().query(name, rdtype)

    zone = {("own.test._report._dmarc.reports.test", "TXT"): txt("v=DMARC1")}
    resolver = Flaky(zone)
    store = SqliteStore(tmp_path / "dmarc.sqlite", 1000)
    relayed = Relayed()
    r = Reporter(settings(), store, resolver, RELAY, sender=relayed)
    run(store.add({Key(T, "own.test", policy("mailto:a@reports.test"), row()): 2}))
    assert run(r.run(AFTER)).not_sent == {"temperror": 1}
    assert [(o.rcpt, o.attempts) for o in run(store.outbox())] == [("a@reports.test", 1)]
    resolver.down = False
    assert run(r.run(AFTER)).sent == 1
    assert [rcpt for rcpt, _ in relayed.sent] == ["a@reports.test"]
    assert xml_of(relayed.sent[0][1]).findtext("record/row/count") == "2"
    assert run(store.outbox()) == []


def test_a_retry_whose_destination_no_longer_agrees_is_not_sent(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    run(store.outbox_put(Outgoing("r1", "a@reports.test", "own.test", b"x", 1)))
    assert run(r.run(AFTER)).not_sent == {"unauthorized": 1}
    assert relayed.sent == [] and run(store.outbox()) == []


def test_retries_are_read_one_at_a_time_under_the_lease(tmp_path: Path) -> None:
    r, store, relayed = reporter(tmp_path)
    for i in range(3):
        run(store.outbox_put(Outgoing(f"r{i}", "dmarc@own.test", "own.test", b"m", 1)))

    async def everything() -> list[Outgoing]:
        raise AssertionError("the whole outbox read at once")

    store.outbox = everything  # type: ignore[method-assign]
    taken = store.lease

    async def lease(name: str, holder: str, ttl: float) -> bool:
        if len(relayed.sent) == 2:  # another process took it over meanwhile
            return False
        return await taken(name, holder, ttl)

    store.lease = lease  # type: ignore[method-assign]
    run(r.run(AFTER))
    assert len(relayed.sent) == 2
    assert run(store.outbox_keys()) == [("r2", "dmarc@own.test")]  # left to the holder
