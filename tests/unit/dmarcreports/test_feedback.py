"""The report's XML: valid against RFC 7489 Appendix C, whatever the rows hold."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
import xmlschema

from gateway.dmarcreports import feedback
from gateway.dmarcreports.feedback import Metadata, build, compress, report, report_ip
from gateway.dmarcreports.record import Row
from tests.support.dmarcschema import schema, validate
from tests.unit.dmarcreports.helpers import POLICY, row

META = Metadata("Example Org", "dmarc@gw.test", "https://gw.test/dmarc", "abc123", 0, 86399)


def test_a_report_validates_against_the_schema() -> None:
    xml = build(META, "own.test", POLICY, [(row(), 3), (row("2001:db8::1", "reject"), 1)])
    validate(xml)
    root = ET.fromstring(xml)
    assert root.findtext("version") == "1.0"
    assert root.findtext("report_metadata/report_id") == "abc123"
    assert [r.findtext("row/count") for r in root.findall("record")] == ["3", "1"]
    assert root.findall("record")[1].findtext("row/source_ip") == "2001:db8:0:0:0:0:0:1"


def test_the_schema_is_not_a_rubber_stamp() -> None:
    """What a broken writer could produce is refused: the checks above mean something."""
    good = build(META, "own.test", POLICY, [(row(), 1)])
    for broken in (
        good.replace(b"<count>1</count>", b"<count>one</count>"),
        good.replace(b"<disposition>none</disposition>", b"<disposition>tag</disposition>"),
        good.replace(b"<version>1.0</version>", b""),
        good.replace(b"<source_ip>192.0.2.7</source_ip>", b"<source_ip>2001:db8::1</source_ip>"),
    ):
        with pytest.raises(xmlschema.XMLSchemaValidationError):
            validate(broken)
    assert schema().is_valid(good.decode())


def test_every_optional_part_and_reason_validates() -> None:
    meta = Metadata("Org", "d@gw.test", None, "id1", 0, 86399, ("5 records left out",))
    r = Row(
        "::ffff:192.0.2.9",
        "quarantine",
        "fail",
        "fail",
        (("sampled_out", ""), ("other", "testing (t=y)"), ("local_policy", "")),
        "own.test",
        "",  # a bounce with no HELO name
        "",
        (("a.test", "", "temperror"), ("b.test", "s1", "policy")),
        ("own.test", "helo", "permerror"),
    )
    xml = build(meta, "own.test", POLICY, [(r, 1)])
    validate(xml)
    root = ET.fromstring(xml)
    assert root.findtext("record/row/source_ip") == "192.0.2.9"
    assert root.find("record/identifiers/envelope_to") is None
    assert root.findtext("report_metadata/error") == "5 records left out"


def test_hostile_text_is_escaped_or_replaced_never_breaks_the_document() -> None:
    r = row(header_from='<x>&"\x00\x1b\ud800.test')
    xml = build(META, "own.test", POLICY, [(r, 1)])
    validate(xml)
    assert ET.fromstring(xml).findtext("record/identifiers/header_from") == '<x>&"???.test'


@pytest.mark.parametrize(
    ("ip", "shown"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::", "2001:db8:0:0:0:0:0:0"),
        ("::1", "0:0:0:0:0:0:0:1"),
        ("::ffff:198.51.100.1", "198.51.100.1"),
    ],
)
def test_addresses_in_the_form_the_schema_knows(ip: str, shown: str) -> None:
    assert report_ip(ip) == shown


def test_the_same_report_compresses_to_the_same_bytes() -> None:
    xml = build(META, "own.test", POLICY, [(row(), 1)])
    assert compress(xml, 86399) == compress(xml, 86399)
    assert gzip.decompress(compress(xml, 86399)) == xml


def test_a_zone_index_is_left_off_and_what_is_no_address_is_none() -> None:
    assert report_ip("fe80::1%eth0") == "fe80:0:0:0:0:0:0:1"
    assert report_ip("192.0.2.1%x") == "192.0.2.1"
    assert report_ip("unknown") is None


def test_a_row_whose_source_is_no_address_is_left_out_not_the_report() -> None:
    rows = [(row(), 5), (row("not-an-address"), 2), (row("fe80::1%eth0"), 1)]
    xml = build(META, "own.test", POLICY, rows)
    validate(xml)
    root = ET.fromstring(xml)
    assert [r.findtext("row/source_ip") for r in root.findall("record")] == [
        "192.0.2.7",
        "fe80:0:0:0:0:0:0:1",
    ]
    assert root.findtext("report_metadata/error") == (
        "1 records left out: the source is not an IP address"
    )
    made = report(META, "own.test", POLICY, rows, 1 << 20, 1 << 20)
    assert (made.records, made.bad_rows, made.bad_messages) == (2, 1, 2)
    assert made.gz is not None
    validate(gzip.decompress(made.gz))


def big_rows(n: int) -> list[tuple[Row, int]]:
    """Rows as an attacker makes them: every field as long as it may be, all unique."""
    label = "a" * 60

    def name(i: int) -> str:
        return f"{i:08d}{label[8:]}.{label}.{label}.{label[:50]}.attacker.test"[:253]

    return [
        (
            Row(
                f"2001:db8::{i:x}",
                "none",
                "fail",
                "fail",
                (("local_policy", ""),),
                name(i),
                name(i + 1),
                "",
                tuple((name(i + k), name(i + k)[:63], "permerror") for k in range(8)),
                (name(i + 1), "mfrom", "none"),
            ),
            n - i,
        )
        for i in range(n)
    ]


def test_records_stop_at_the_xml_size_the_most_frequent_first_and_the_report_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The work is bounded by the size, whatever the rows: a record past it is the
    last one written."""
    written = []
    record = feedback._record

    def counted(r: Row, ip: str, count: int) -> str:
        written.append(count)
        return record(r, ip, count)

    monkeypatch.setattr(feedback, "_record", counted)
    rows = big_rows(1000)
    one = len(record(rows[0][0], "2001:db8:0:0:0:0:0:0", 1000).encode())
    made = report(META, "attacker.test", POLICY, rows, 9 * one + one // 2, 1 << 30)
    assert made.records == 9 and made.too_large == 991
    assert len(written) == 10  # the one that did not fit, and no more
    assert made.gz is not None
    xml = gzip.decompress(made.gz)
    validate(xml)
    root = ET.fromstring(xml)
    assert [int(r.findtext("row/count") or 0) for r in root.findall("record")] == list(
        range(1000, 991, -1)
    )
    assert root.findtext("report_metadata/error") == (
        "991 records left out: the report's size limit"
    )


def test_a_report_past_its_compressed_size_stops_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too big for every destination: None, and the gzip stream is not written to
    the end (the rest of the document is never compressed)."""
    taken = []
    document = feedback._document

    def counted(*args: Any) -> Iterator[bytes]:
        for chunk in document(*args):
            taken.append(chunk)
            yield chunk

    monkeypatch.setattr(feedback, "_document", counted)
    rows = [(row(f"2001:db8::{i:x}"), 1) for i in range(800)]  # 570 kB of XML
    made = report(META, "own.test", POLICY, rows, 1 << 30, 2048)
    assert made.gz is None
    # Stopped at the first look at the gzip's size (every FLUSH_EVERY bytes of XML).
    assert len(taken) < 400
    full = report(META, "own.test", POLICY, rows, 1 << 30, 1 << 30)
    assert full.gz is not None and len(full.gz) > 2048
    assert gzip.decompress(full.gz) == build(META, "own.test", POLICY, rows)
