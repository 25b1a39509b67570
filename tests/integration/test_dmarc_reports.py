"""DMARC aggregate reports end to end: real gateway processes evaluate real mail
against DMARC records served by the loopback DNS server, record it in the store,
and a report run (the `smtp-gateway dmarc-report` command against the same store,
or the gateway's own scheduler at its start) sends the reports through a real
backend; the delivered MIME messages are parsed and their gzipped XML validated
against the RFC 7489 schema. Time never passes by waiting: a run is told the time
(--now), or finds an interval that ended before the test began."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.dmarcreports.record import Key, Policy, Row
from gateway.dmarcreports.redisstore import RedisReportStore, group_id
from gateway.dmarcreports.store import Outgoing, SqliteStore
from tests.support.certs import make_cert
from tests.support.dkimkeys import rsa_key, sign
from tests.support.dmarcschema import validate_gz
from tests.support.dnsserver import DnsServer
from tests.support.procs import ROOT, Backend, Gateway, base_config
from tests.support.redisserver import RedisServer

RSA = rsa_key()
DAY = 86400


def zone() -> dict[str, list[tuple[str, Any]]]:
    return {
        # Reports to the domain itself: no authorisation needed.
        "_dmarc.own.test": [("TXT", "v=DMARC1; p=none; rua=mailto:dmarc@own.test")],
        "own.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
        "rsa._domainkey.own.test": [("TXT", RSA.dns)],
        # Two outside destinations: one says it takes outside.test's reports, the
        # other says nothing; a third URI past the cap of two is never used.
        "_dmarc.outside.test": [
            (
                "TXT",
                "v=DMARC1; p=reject; rua=mailto:agg@reports.test,"
                "mailto:bad@unauthorized.test,mailto:third@reports.test",
            )
        ],
        "outside.test._report._dmarc.reports.test": [("TXT", "v=DMARC1")],
        # A destination whose size limit no report fits.
        "_dmarc.small.test": [("TXT", "v=DMARC1; p=none; rua=mailto:tiny@small.test!1k")],
        # No rua: nothing to record.
        "_dmarc.norua.test": [("TXT", "v=DMARC1; p=none")],
    }


def message(from_domain: str, n: int = 1) -> bytes:
    return (
        f"From: Someone <someone@{from_domain}>\r\nTo: bob@example.test\r\n"
        f"Subject: hello {n}\r\nDate: Sun, 22 Nov 2026 08:00:00 +0000\r\n"
        f"Message-ID: <{n}@{from_domain}>\r\n\r\nHello.\r\n"
    ).encode()


def send(gw: Gateway, sender: str, data: bytes) -> int:
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail(sender)
        s.rcpt("bob@example.test")
        code, _ = s.data(data)
        return code


def config(backend: Backend, dns: DnsServer, path: Path, **reports: Any) -> dict[str, Any]:
    return base_config(
        backend.url,
        trusted_networks=[],
        dns={"nameservers": [dns.address], "timeout": 1.0},
        dmarc_reports={
            "enabled": True,
            "sqlite_path": str(path),
            "email": "dmarc-reports@gw.test",
            "org_name": "Gateway Test",
            "flush_interval": 0.2,
            **reports,
        },
    )


def after_today() -> int:
    """A time at which today's (UTC) interval is over, its send delay included."""
    return (int(time.time()) // DAY + 1) * DAY + 3600


def report_command(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "dmarc-report", "--config", str(cfg_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def reports(backend: Backend) -> list[tuple[dict[str, Any], EmailMessage]]:
    out = []
    for m in backend.messages():
        parsed = email.message_from_bytes(m["data"], policy=email.policy.SMTP)
        assert isinstance(parsed, EmailMessage)
        if str(parsed["Subject"]).startswith("Report Domain:"):
            out.append((m, parsed))
    return out


def attachment(msg: EmailMessage) -> tuple[str, bytes]:
    [part] = [p for p in msg.iter_attachments()]
    assert part.get_content_type() == "application/gzip"
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return str(part.get_filename()), data


@pytest.fixture
def dns(dns_server: DnsServer) -> DnsServer:
    dns_server.add(zone())
    return dns_server


def test_recorded_evaluations_become_valid_reports_sent_through_the_backend(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    store = tmp_path / "state" / "dmarc.sqlite"  # the folder is made on start
    gw = gateway_factory(config(backend, dns, store))
    signed = sign(message("own.test"), RSA, "own.test", "rsa")
    assert send(gw, "bounces@own.test", signed) == 250
    assert send(gw, "bounces@own.test", signed) == 250  # the same row: counted twice
    assert send(gw, "x@elsewhere.test", message("outside.test")) == 550  # DMARC p=reject
    assert send(gw, "x@elsewhere.test", message("small.test")) == 250
    assert send(gw, "x@elsewhere.test", message("norua.test")) == 250
    assert gw.stop() == 0  # draining writes what is buffered
    assert store.is_file()
    delivered = len(backend.messages())
    assert delivered == 4

    done = report_command(gw.config_path, "--now", str(after_today()))
    assert done.returncode == 0, done.stderr
    assert "3 reports, 2 sent" in done.stdout
    assert "too_big 1" in done.stdout and "unauthorized 1" in done.stdout

    got = {str(m["To"]): (env, m) for env, m in reports(backend)}
    assert sorted(got) == ["agg@reports.test", "dmarc@own.test"]
    today = int(time.time()) // DAY * DAY
    for rcpt, domain in (("dmarc@own.test", "own.test"), ("agg@reports.test", "outside.test")):
        env, msg = got[rcpt]
        assert env["mail_from"] == "dmarc-reports@gw.test" and env["rcpt_tos"] == [rcpt]
        assert msg.get_content_type() == "multipart/mixed"
        assert msg.get_body(("plain",)) is not None
        subject = str(msg["Subject"])
        assert subject.startswith(f"Report Domain: {domain} Submitter: gw.test Report-ID: <")
        name, gz = attachment(msg)
        xml = validate_gz(gz)  # against RFC 7489 Appendix C
        root = ET.fromstring(xml)
        report_id = root.findtext("report_metadata/report_id")
        assert subject.endswith(f"<{report_id}>")
        assert name == f"gw.test!{domain}!{today}!{today + DAY - 1}!{report_id}.xml.gz"
        assert root.findtext("report_metadata/org_name") == "Gateway Test"
        assert root.findtext("report_metadata/date_range/begin") == str(today)
        assert root.findtext("policy_published/domain") == domain
    own = ET.fromstring(validate_gz(attachment(got["dmarc@own.test"][1])[1]))
    [rec] = own.findall("record")
    assert rec.findtext("row/source_ip") == "127.0.0.1"
    assert rec.findtext("row/count") == "2"
    assert [rec.findtext(f"row/policy_evaluated/{k}") for k in ("disposition", "dkim", "spf")] == [
        "none",
        "pass",
        "pass",
    ]
    assert rec.findtext("identifiers/header_from") == "own.test"
    assert rec.findtext("identifiers/envelope_from") == "own.test"
    assert rec.findtext("identifiers/envelope_to") == "example.test"
    assert [rec.findtext(f"auth_results/dkim/{k}") for k in ("domain", "selector", "result")] == [
        "own.test",
        "rsa",
        "pass",
    ]
    assert [rec.findtext(f"auth_results/spf/{k}") for k in ("domain", "scope", "result")] == [
        "own.test",
        "mfrom",
        "pass",
    ]
    outside = ET.fromstring(validate_gz(attachment(got["agg@reports.test"][1])[1]))
    [rec] = outside.findall("record")
    assert [rec.findtext(f"row/policy_evaluated/{k}") for k in ("disposition", "dkim", "spf")] == [
        "reject",
        "fail",
        "fail",
    ]
    assert outside.findtext("policy_published/p") == "reject"
    # The authorisation was asked of the DNS, for the outside destinations only.
    assert dns.asked("outside.test._report._dmarc.reports.test", "TXT") == 1
    assert dns.asked("outside.test._report._dmarc.unauthorized.test", "TXT") == 1
    assert dns.asked("own.test._report._dmarc.own.test") == 0

    again = report_command(gw.config_path, "--now", str(after_today()))
    assert again.returncode == 0 and "0 reports, 0 sent" in again.stdout  # sent once only
    assert len(reports(backend)) == 2


def test_dry_run_prints_the_reports_and_sends_nothing(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    gw = gateway_factory(config(backend, dns, tmp_path / "dmarc.sqlite"))
    assert send(gw, "x@elsewhere.test", message("outside.test")) == 550
    gw.stop()
    dry = report_command(gw.config_path, "--dry-run", "--now", str(after_today()))
    assert dry.returncode == 0, dry.stderr
    assert "to agg@reports.test: would send gw.test!outside.test!" in dry.stdout
    assert "to bad@unauthorized.test: not sent: unauthorized" in dry.stdout
    assert "<header_from>outside.test</header_from>" in dry.stdout
    assert reports(backend) == []
    # Nothing changed: the real run still has the report to send.
    done = report_command(gw.config_path, "--now", str(after_today()))
    assert "1 reports, 1 sent" in done.stdout, done.stderr
    assert len(reports(backend)) == 1


def test_disabled_records_nothing_and_sends_nothing(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    store = tmp_path / "dmarc.sqlite"
    cfg = config(backend, dns, store, enabled=False)
    gw = gateway_factory(cfg)
    assert send(gw, "bounces@own.test", sign(message("own.test"), RSA, "own.test", "rsa")) == 250
    gw.stop()
    assert not store.exists()
    done = report_command(gw.config_path, "--now", str(after_today()))
    assert done.returncode == 0 and "nothing is recorded or sent" in done.stderr
    assert reports(backend) == []


def test_a_submission_relay_with_starttls_required(
    backend_factory: Callable[..., Backend],
    dns: DnsServer,
    gateway_factory: Callable[..., Gateway],
    tmp_path: Path,
) -> None:
    inbound = backend_factory()
    cert, key = make_cert(tmp_path / "certs", "relay.test")
    relay = backend_factory("--tls-cert", str(cert), "--tls-key", str(key))
    relay_cfg = {"url": relay.url, "tls": "required", "ca_file": str(cert)}
    gw = gateway_factory(config(inbound, dns, tmp_path / "dmarc.sqlite", relay=relay_cfg))
    assert send(gw, "x@elsewhere.test", message("outside.test")) == 550
    gw.stop()
    done = report_command(gw.config_path, "--now", str(after_today()))
    assert "1 reports, 1 sent" in done.stdout, done.stderr
    [(env, msg)] = reports(relay)
    assert env["tls"] is True and env["rcpt_tos"] == ["agg@reports.test"]
    validate_gz(attachment(msg)[1])
    assert reports(inbound) == []


def test_a_report_the_relay_defers_is_sent_at_the_next_run(
    backend_factory: Callable[..., Backend],
    dns: DnsServer,
    gateway_factory: Callable[..., Gateway],
    tmp_path: Path,
) -> None:
    inbound = backend_factory()
    deferring = backend_factory("--tempfail-rcpt", "dmarc@own.test")
    store = tmp_path / "dmarc.sqlite"
    gw = gateway_factory(config(inbound, dns, store, relay={"url": deferring.url, "tls": "none"}))
    assert send(gw, "bounces@own.test", sign(message("own.test"), RSA, "own.test", "rsa")) == 250
    gw.stop()
    first = report_command(gw.config_path, "--now", str(after_today()))
    assert "1 reports, 0 sent; not sent: relay_error 1" in first.stdout, first.stderr
    assert reports(deferring) == []
    # The relay takes mail again (here: the configuration names one that does).
    cfg = config(inbound, dns, store, relay={"url": inbound.url, "tls": "none"})
    gw.config_path.write_text(yaml.safe_dump(cfg))
    second = report_command(gw.config_path, "--now", str(after_today()))
    assert "0 reports, 1 sent" in second.stdout, second.stderr
    [(env, msg)] = reports(inbound)
    assert env["rcpt_tos"] == ["dmarc@own.test"]
    validate_gz(attachment(msg)[1])


# -- the gateway's own runs: one process sends ---------------------------------------------

YESTERDAY = int(time.time()) // DAY * DAY - DAY
ROW = Row(
    "192.0.2.7",
    "none",
    "pass",
    "fail",
    (),
    "own.test",
    "own.test",
    "",
    (),
    ("own.test", "mfrom", "pass"),
)
POLICY = Policy("none", "none", "r", "r", 100, "0", "mailto:dmarc@own.test")


def test_with_workers_one_process_sends_at_start_for_an_interval_that_ended(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    path = tmp_path / "dmarc.sqlite"

    async def fill() -> None:
        s = SqliteStore(path, 1000)
        await s.add({Key(YESTERDAY, "own.test", POLICY, ROW): 5})
        await s.close()

    asyncio.run(fill())
    cfg = config(backend, dns, path)
    cfg["workers"] = 2
    gw = gateway_factory(cfg)
    gw.wait_log(lambda e: e.get("event") == "dmarc_report_run", timeout=20)
    [(_, msg)] = reports(backend)
    root = ET.fromstring(validate_gz(attachment(msg)[1]))
    assert root.findtext("record/row/count") == "5"
    assert root.findtext("report_metadata/date_range/begin") == str(YESTERDAY)
    runs = [e for e in gw.events() if e.get("event") == "dmarc_report_run"]
    assert len(runs) == 1 and runs[0]["sent"] == 1  # worker 1 runs no scheduler


def test_replicas_on_redis_send_each_report_once(
    backend: Backend,
    dns: DnsServer,
    gateway_factory: Callable[..., Gateway],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    async def fill() -> None:
        s = RedisReportStore(redis_server.url, "smtp-gateway:", 0.5, 1000)
        await s.add({Key(YESTERDAY, "own.test", POLICY, ROW): 3})
        await s.close()

    asyncio.run(fill())
    gws = []
    for i in range(2):
        cfg = config(backend, dns, tmp_path / f"unused{i}.sqlite", store="redis")
        cfg["store"] = {"redis_url": redis_server.url}
        gws.append(gateway_factory(cfg))
    for gw in gws:
        gw.wait_log(lambda e: e.get("event") == "dmarc_report_run", timeout=20)
    [(_, msg)] = reports(backend)
    root = ET.fromstring(validate_gz(attachment(msg)[1]))
    assert root.findtext("record/row/count") == "3"
    # And what replicas record goes to the one store, for one report.
    signed = sign(message("own.test"), RSA, "own.test", "rsa")
    assert send(gws[0], "bounces@own.test", signed) == 250
    assert send(gws[1], "bounces@own.test", signed) == 250
    for gw in gws:
        gw.stop()
    done = report_command(gws[0].config_path, "--now", str(after_today()))
    assert "1 reports, 1 sent" in done.stdout, done.stderr
    latest = reports(backend)[-1][1]
    assert ET.fromstring(validate_gz(attachment(latest)[1])).findtext("record/row/count") == "2"


# -- through a real Postfix -----------------------------------------------------------------


@pytest.mark.slow
def test_reports_go_out_through_a_real_postfix_as_the_submission_relay(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """Postfix (its own instance, mynetworks 127.0.0.1) takes the report as a relay
    would and delivers it to the mailbox of the domain's rua."""
    from tests.support.mta import Postfix

    with Postfix(tmp_path / "postfix", users=("dmarc",), domain="own.test") as pf:
        cfg = config(backend, dns, tmp_path / "dmarc.sqlite", relay={"url": pf.url, "tls": "none"})
        gw = gateway_factory(cfg)
        signed = sign(message("own.test"), RSA, "own.test", "rsa")
        assert send(gw, "bounces@own.test", signed) == 250
        gw.stop()
        done = report_command(gw.config_path, "--now", str(after_today()))
        assert "1 reports, 1 sent" in done.stdout, done.stderr
        [raw] = pf.wait_messages("dmarc", 1)
        msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
        assert isinstance(msg, EmailMessage)
        assert str(msg["Subject"]).startswith("Report Domain: own.test Submitter: gw.test")
        root = ET.fromstring(validate_gz(attachment(msg)[1]))
        assert root.findtext("record/row/count") == "1"
    assert reports(backend) == []  # the backend had only the inbound message


def test_the_redis_store_counts_bounds_and_leases_as_the_sqlite_one(
    redis_server: RedisServer,
) -> None:
    """Its Lua scripts in a real redis-server: counts add up across flushes, a new row
    past max_rows is dropped and counted, the lease is one holder's (renewed by it,
    refused to another), and a group deleted is gone."""

    async def go() -> None:
        a = RedisReportStore(redis_server.url, "t:", 0.5, 2)
        b = RedisReportStore(redis_server.url, "t:", 0.5, 2)
        other = Row(*ROW[:5], "other.test", *ROW[6:])
        third = Row("192.0.2.99", *ROW[1:])
        await a.add({Key(YESTERDAY, "own.test", POLICY, ROW): 2})
        await b.add(
            {
                Key(YESTERDAY, "own.test", POLICY, ROW): 3,
                Key(YESTERDAY, "own.test", POLICY, other): 1,
            }
        )
        await b.add({Key(YESTERDAY, "own.test", POLICY, third): 4})  # a third row: no room
        assert await a.intervals() == [YESTERDAY]
        [g] = await a.groups(YESTERDAY)
        assert (g.messages, g.rows) == (6, 2)
        assert await a.rows(g, 1) == [(ROW, 5)]
        assert await a.dropped(YESTERDAY) == 4
        assert await a.lease("run", "a", 60)
        assert not await b.lease("run", "b", 60)
        assert await a.lease("run", "a", 60)  # renewed
        await b.release("run", "b")  # not its to release
        assert not await b.lease("run", "b", 60)
        await a.release("run", "a")
        assert await b.lease("run", "b", 60)
        await a.delete_group(g)
        await a.clear_dropped(YESTERDAY)
        assert await b.groups(YESTERDAY) == [] and await b.intervals() == []
        await a.close()
        await b.close()

    asyncio.run(go())


# -- what a sender controls: its rows, its names ------------------------------------------


def test_one_senders_unique_rows_leave_room_for_every_other_domain(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """The reviewer's crowd-out at small scale, through a real gateway: a sender
    makes every message a new row (a new MAIL FROM domain each); with max_rows 6
    it used to take all six and own.test's mail was dropped. Its share is five:
    own.test is reported in full, and the sender's report says what it lost."""
    dns.add({"_dmarc.attacker.test": [("TXT", "v=DMARC1; p=none; rua=mailto:r@attacker.test")]})
    gw = gateway_factory(
        config(backend, dns, tmp_path / "dmarc.sqlite", max_rows=6, max_rows_per_domain=5)
    )
    for i in range(8):
        assert send(gw, f"x@e{i}.elsewhere.test", message("attacker.test", i)) == 250
    signed = sign(message("own.test"), RSA, "own.test", "rsa")
    for _ in range(3):
        assert send(gw, "bounces@own.test", signed) == 250
    assert gw.stop() == 0
    done = report_command(gw.config_path, "--now", str(after_today()))
    assert "2 reports, 2 sent" in done.stdout, done.stderr
    got = {str(m["To"]): ET.fromstring(validate_gz(attachment(m)[1])) for _, m in reports(backend)}
    own = got["dmarc@own.test"]
    assert [r.findtext("row/count") for r in own.findall("record")] == ["3"]
    assert own.findall("report_metadata/error") == []
    attacker = got["r@attacker.test"]
    assert len(attacker.findall("record")) == 5
    assert [e.text for e in attacker.findall("report_metadata/error")] == [
        "3 messages of this domain were not recorded (limits reached)"
    ]


def test_domains_that_are_no_host_names_never_reach_a_report_mail(
    backend: Backend, dns: DnsServer, gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """The reviewer's names: a DNS name may hold "/" or controls, and the policy
    domain goes into the report mail's Subject, Message-ID and file name. Such a
    domain's mail is not recorded; own.test's report goes as ever."""
    weird = ["x/y.attacker.test", "x\x01y.attacker.test", "x&y'z.attacker.test"]
    rua = "v=DMARC1; p=none; rua=mailto:r@attacker.test"
    dns.add({f"_dmarc.{d}": [("TXT", rua)] for d in weird})
    gw = gateway_factory(config(backend, dns, tmp_path / "dmarc.sqlite"))
    for i, domain in enumerate(weird):
        assert send(gw, "x@elsewhere.test", message(domain, i)) == 250
        assert dns.asked(f"_dmarc.{domain}", "TXT") == 1  # DMARC found its record
    assert send(gw, "bounces@own.test", sign(message("own.test"), RSA, "own.test", "rsa")) == 250
    assert gw.stop() == 0

    async def recorded() -> set[str]:
        store = SqliteStore(tmp_path / "dmarc.sqlite", 1000)
        try:
            return {g.domain for g in await store.groups(int(time.time()) // DAY * DAY)}
        finally:
            await store.close()

    assert asyncio.run(recorded()) == {"own.test"}
    done = report_command(gw.config_path, "--now", str(after_today()))
    assert "1 reports, 1 sent" in done.stdout, done.stderr
    [(env, msg)] = reports(backend)
    assert env["rcpt_tos"] == ["dmarc@own.test"]
    assert str(msg["Subject"]).startswith("Report Domain: own.test ")
    assert attachment(msg)[0].startswith("gw.test!own.test!")


def test_the_redis_store_gives_each_organisation_a_share_and_reads_one_group_at_a_time(
    redis_server: RedisServer,
) -> None:
    """As the SQLite store (tests/unit/dmarcreports/test_store.py), in a real
    redis-server: one sender's 200 unique rows fill its share (50) and no more,
    counted for it alone; another domain's 1,000 messages still count; subdomains
    share their organisation's share; a deleted group frees it; the lost counts are
    per domain; rows are read one group at a time; the outbox one message at a time."""
    attacker = Policy("none", "none", "r", "r", 100, "0", "mailto:r@attacker.test")

    async def go() -> None:
        s = RedisReportStore(redis_server.url, "share:", 0.5, 200, 50)
        await s.add(
            {
                Key(
                    YESTERDAY,
                    f"s{i % 2}.attacker.test",
                    attacker,
                    Row(f"2001:db8::{i:x}", *ROW[1:]),
                ): 1
                for i in range(200)
            }
        )
        await s.add({Key(YESTERDAY, "own.test", POLICY, ROW): 1000}, {(YESTERDAY, "own.test"): 4})
        groups = await s.groups(YESTERDAY)
        assert (groups[0].domain, groups[0].messages, groups[0].rows) == ("own.test", 1000, 1)
        # The organisation's share, between its subdomains: 50 rows, 150 lost.
        assert {g.domain for g in groups[1:]} <= {"s0.attacker.test", "s1.attacker.test"}
        assert sum(g.rows for g in groups[1:]) == sum(g.messages for g in groups[1:]) == 50
        lost = [await s.dropped(YESTERDAY, f"s{i}.attacker.test") for i in range(2)]
        assert sum(lost) == 150
        assert await s.dropped(YESTERDAY, "own.test") == 4
        assert await s.dropped(YESTERDAY) == 154
        assert await s.rows(groups[0], 10) == [(ROW, 1000)]
        # Each group its own hash: a run never reads the interval whole.
        assert (
            await s.r.hlen(f"share:dmarc:rows:{YESTERDAY}:{group_id('own.test', POLICY)[0]}") == 1
        )
        assert len(await s.rows(groups[1], 10)) == 10
        await s.delete_group(groups[1])
        await s.add({Key(YESTERDAY, "s2.attacker.test", attacker, ROW): 2})  # room again
        assert "s2.attacker.test" in {g.domain for g in await s.groups(YESTERDAY)}
        for g in await s.groups(YESTERDAY):
            await s.delete_group(g)
        await s.clear_dropped(YESTERDAY)
        assert await s.intervals() == [] and await s.dropped(YESTERDAY) == 0
        assert await s.r.keys("share:dmarc:*") == []  # nothing left behind
        await s.outbox_put(Outgoing("r2", "b@x.test", "own.test", b"two\r\n", 0))
        await s.outbox_put(Outgoing("r1", "a@x.test", "own.test", b"one", 1))
        assert await s.outbox_keys() == [("r1", "a@x.test"), ("r2", "b@x.test")]
        assert await s.outbox_get("r2", "b@x.test") == Outgoing(
            "r2", "b@x.test", "own.test", b"two\r\n", 0
        )
        assert await s.outbox_get("r3", "b@x.test") is None
        await s.close()

    asyncio.run(go())
