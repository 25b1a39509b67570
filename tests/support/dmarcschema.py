"""The DMARC aggregate report schema of RFC 7489 Appendix C (tests/data/dmarc/,
vendored verbatim), made usable by the two mechanical repairs its README explains,
and a validator for the reports the gateway writes."""

from __future__ import annotations

import functools
import gzip
import re
from pathlib import Path

import xmlschema

XSD = Path(__file__).resolve().parents[1] / "data" / "dmarc" / "rfc7489-appendix-c.xsd"


def repaired(text: str) -> str:
    """The RFC's text with (1) no targetNamespace, which its unprefixed type names
    cannot resolve against (and which reports in the wild, and the RFC's own
    example, do not use); (2) the IPAddress pattern joined back onto one line,
    as the RFC printed it wrapped. Each repair must apply exactly once."""
    ns = '\n  targetNamespace="http://dmarc.org/dmarc-xml/0.1">'
    assert text.count(ns) == 1
    text = text.replace(ns, ">")
    wrapped = re.compile(r'(<xs:pattern value="[^"]*?)\n\s+([^"]*?)\n\s+([^"]*")')
    text, n = wrapped.subn(r"\1\2\3", text)
    assert n == 1
    return text


@functools.cache
def schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(repaired(XSD.read_text()))


def validate(xml: bytes) -> None:
    """Raises xmlschema.XMLSchemaValidationError if `xml` is not a valid report."""
    schema().validate(xml.decode())


def validate_gz(data: bytes) -> bytes:
    xml = gzip.decompress(data)
    validate(xml)
    return xml
