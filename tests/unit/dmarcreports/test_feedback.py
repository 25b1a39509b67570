"""The report's XML: valid against RFC 7489 Appendix C, whatever the rows hold."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET

import pytest
import xmlschema

from gateway.dmarcreports.feedback import Metadata, build, compress, report_ip
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
