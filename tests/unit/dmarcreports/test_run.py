"""One reporting run, with a store on disk, a dict resolver and a relay that notes
what it is handed: bounds, authorisation, size limits, retries, the lease."""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from gateway import config, metrics
from gateway.dmarcreports.record import Key, Policy
from gateway.dmarcreports.relay import Relay, SendFailed
from gateway.dmarcreports.run import LEASE, Reporter
from gateway.dmarcreports.store import SqliteStore
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
