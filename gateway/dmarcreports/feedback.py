"""The aggregate report itself: the XML of RFC 7489 Appendix C, gzipped.

The format is RFC 7489's (version 1.0, no XML namespace): what every report
processor reads today. tests/data/dmarc/ holds that schema, and the tests validate
what this module writes against it. Its IPAddress type knows IPv6 only in the
uncompressed form (eight groups), so an IPv6 source is written that way (RFC 4291
2.2's first form, no less an IPv6 address for it).

Every value from a message (domains, selectors, addresses) is text in an element,
escaped by ElementTree; characters XML 1.0 cannot hold at all are replaced.
"""

from __future__ import annotations

import gzip
import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from gateway.dmarcreports.record import Policy, Row

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    return _NOT_XML.sub("?", value)


def report_ip(ip: str) -> str:
    """The address as the report writes it: IPv4 dotted, IPv6 as eight groups."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # not an address: the schema check in the tests would say so
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return ":".join(f"{int(g, 16):x}" for g in addr.exploded.split(":"))
    return str(addr)


@dataclass(frozen=True, slots=True)
class Metadata:
    org_name: str
    email: str
    extra_contact_info: str | None
    report_id: str
    begin: int  # UTC seconds, the interval's first
    end: int  # UTC seconds, the interval's last (inclusive)
    errors: tuple[str, ...] = ()


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = _text(str(text))
    return el


def build(meta: Metadata, domain: str, policy: Policy, rows: list[tuple[Row, int]]) -> bytes:
    """The report's XML (UTF-8, with its declaration)."""
    root = ET.Element("feedback")
    _sub(root, "version", "1.0")
    md = _sub(root, "report_metadata")
    _sub(md, "org_name", meta.org_name)
    _sub(md, "email", meta.email)
    if meta.extra_contact_info:
        _sub(md, "extra_contact_info", meta.extra_contact_info)
    _sub(md, "report_id", meta.report_id)
    dr = _sub(md, "date_range")
    _sub(dr, "begin", meta.begin)
    _sub(dr, "end", meta.end)
    for error in meta.errors:
        _sub(md, "error", error)
    pp = _sub(root, "policy_published")
    _sub(pp, "domain", domain)
    _sub(pp, "adkim", policy.adkim)
    _sub(pp, "aspf", policy.aspf)
    _sub(pp, "p", policy.p)
    _sub(pp, "sp", policy.sp)
    _sub(pp, "pct", policy.pct)
    _sub(pp, "fo", policy.fo)
    for row, count in rows:
        rec = _sub(root, "record")
        r = _sub(rec, "row")
        _sub(r, "source_ip", report_ip(row.source_ip))
        _sub(r, "count", count)
        pe = _sub(r, "policy_evaluated")
        _sub(pe, "disposition", row.disposition)
        _sub(pe, "dkim", row.dkim)
        _sub(pe, "spf", row.spf)
        for kind, comment in row.reasons:
            reason = _sub(pe, "reason")
            _sub(reason, "type", kind)
            if comment:
                _sub(reason, "comment", comment)
        ids = _sub(rec, "identifiers")
        if row.envelope_to:
            _sub(ids, "envelope_to", row.envelope_to)
        _sub(ids, "envelope_from", row.envelope_from)
        _sub(ids, "header_from", row.header_from)
        auth = _sub(rec, "auth_results")
        for d, s, result in row.dkim_results:
            dk = _sub(auth, "dkim")
            _sub(dk, "domain", d)
            if s:
                _sub(dk, "selector", s)
            _sub(dk, "result", result)
        spf = _sub(auth, "spf")
        _sub(spf, "domain", row.spf_result[0])
        _sub(spf, "scope", row.spf_result[1])
        _sub(spf, "result", row.spf_result[2])
    ET.indent(root)
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        + bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False))
        + b"\n"
    )


def compress(xml: bytes, mtime: int) -> bytes:
    """gzip, with the interval's end as the member's time: the same report is the
    same bytes."""
    return gzip.compress(xml, compresslevel=9, mtime=mtime)
