"""The aggregate report itself: the XML of RFC 7489 Appendix C, gzipped.

The format is RFC 7489's (version 1.0, no XML namespace): what every report
processor reads today. tests/data/dmarc/ holds that schema, and the tests validate
what this module writes against it. Its IPAddress type knows IPv6 only in the
uncompressed form (eight groups), so an IPv6 source is written that way (RFC 4291
2.2's first form, no less an IPv6 address for it).

Every value from a message (domains, selectors, addresses) is text in an element,
escaped by ElementTree; characters XML 1.0 cannot hold at all are replaced. A row
whose source is no IP address is left out (counted), never the report.

`report` bounds the work whatever the rows hold: records go in, most frequent
first, while their XML stays within a size (max_report_size: the rest are left
out, and an <error> says how many), and the gzip stream stops as soon as the
compressed bytes pass the largest size any destination takes, the rest never
written. Still CPU work of a second or so for a large report: run.py runs it in a
thread, off the event loop that serves mail.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace

from gateway.dmarcreports.record import Policy, Row

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    return _NOT_XML.sub("?", value)


def report_ip(ip: str) -> str | None:
    """The address as the report writes it: IPv4 dotted, IPv6 as eight groups
    (an IPv6 zone index, "%eth0", left off); None for no address."""
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
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


def _head(meta: Metadata, domain: str, policy: Policy) -> str:
    """The document up to its first record (indented as ET.indent would)."""
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
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + text.removesuffix("</feedback>")


def _record(row: Row, ip: str, count: int) -> str:
    rec = ET.Element("record")
    r = _sub(rec, "row")
    _sub(r, "source_ip", ip)
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
    ET.indent(rec, level=1)
    return "  " + ET.tostring(rec, encoding="unicode") + "\n"


# Bytes of XML compressed between two looks at the gzip's size (a sync flush costs
# a few bytes of output each).
FLUSH_EVERY = 256 * 1024


@dataclass(frozen=True, slots=True)
class Report:
    """A report as `report` made it: its gzip (None: past the size asked), and what
    of its rows it left out (an <error> in it says so)."""

    gz: bytes | None
    records: int
    too_large: int  # rows past `max_xml`
    bad_rows: int  # rows whose source is no IP address
    bad_messages: int


def _records(rows: list[tuple[Row, int]], max_xml: int) -> tuple[list[bytes], int, int, int]:
    """The records, most frequent first, while their XML stays within `max_xml`;
    and the rows left out: (records, past the size, bad sources, their messages)."""
    out: list[bytes] = []
    size = bad_rows = bad_messages = 0
    for i, (row, count) in enumerate(rows):
        ip = report_ip(row.source_ip)
        if ip is None:
            bad_rows += 1
            bad_messages += count
            continue
        text = _record(row, ip, count).encode()
        size += len(text)
        if size > max_xml:
            return out, len(rows) - i, bad_rows, bad_messages
        out.append(text)
    return out, 0, bad_rows, bad_messages


def _document(meta: Metadata, domain: str, policy: Policy, records: list[bytes]) -> Iterator[bytes]:
    yield _head(meta, domain, policy).encode()
    yield from records
    yield b"</feedback>\n"


def build(meta: Metadata, domain: str, policy: Policy, rows: list[tuple[Row, int]]) -> bytes:
    """The report's XML (UTF-8, with its declaration), every row in it."""
    records, _, bad, _ = _records(rows, 1 << 62)
    if bad:
        meta = replace(
            meta, errors=(*meta.errors, f"{bad} records left out: the source is not an IP address")
        )
    return b"".join(_document(meta, domain, policy, records))


def report(
    meta: Metadata,
    domain: str,
    policy: Policy,
    rows: list[tuple[Row, int]],
    max_xml: int,
    max_gzip: int,
) -> Report:
    """The report, gzipped (as `compress`): its records, most frequent first, while
    their XML stays within `max_xml` (the rest left out, and said so); None for the
    gzip as soon as the compressed bytes pass `max_gzip`, the rest never written.
    The work is bounded by `max_xml`, whatever the rows hold."""
    records, too_large, bad_rows, bad_messages = _records(rows, max_xml)
    errors = list(meta.errors)
    if too_large:
        errors.append(f"{too_large} records left out: the report's size limit")
    if bad_rows:
        errors.append(f"{bad_rows} records left out: the source is not an IP address")
    meta = replace(meta, errors=tuple(errors))
    buf = io.BytesIO()
    unflushed = 0
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=meta.end) as f:
        for chunk in _document(meta, domain, policy, records):
            f.write(chunk)
            unflushed += len(chunk)
            if unflushed >= FLUSH_EVERY:
                # zlib holds what it has compressed until a block is full, hundreds
                # of kilobytes of repetitive XML: flushed, the size so far is known.
                f.flush()
                unflushed = 0
                if buf.tell() > max_gzip:
                    return Report(None, len(records), too_large, bad_rows, bad_messages)
    gz = buf.getvalue()
    return Report(
        gz if len(gz) <= max_gzip else None, len(records), too_large, bad_rows, bad_messages
    )


def compress(xml: bytes, mtime: int) -> bytes:
    """gzip, with the interval's end as the member's time: the same report is the
    same bytes."""
    return gzip.compress(xml, compresslevel=9, mtime=mtime)
