"""The mail that carries a report: subject, file name, parts."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from email.message import EmailMessage

import pytest

from gateway.dmarcreports.message import Envelope, compose, filename, subject

ENV = Envelope(
    "dmarc-reports@gw.example", "agg@own.test", "own.test", "0f1e2d", 1700006400, 1700092799
)


def test_subject_and_file_name_as_rfc_7489_asks() -> None:
    assert subject(ENV) == "Report Domain: own.test Submitter: gw.example Report-ID: <0f1e2d>"
    assert filename(ENV) == "gw.example!own.test!1700006400!1700092799!0f1e2d.xml.gz"


def test_a_multipart_message_with_a_text_part_and_the_gzip_attachment() -> None:
    gz = b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4
    raw = compose(ENV, "Example Org", gz, 1700093000)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/mixed"
    assert (msg["From"], msg["To"]) == (ENV.sender, ENV.rcpt)
    assert msg["Subject"] == subject(ENV)
    assert msg["Auto-Submitted"] == "auto-generated"
    text = msg.get_body(("plain",))
    assert text is not None and "Example Org" in text.get_content()
    [part] = list(msg.iter_attachments())
    assert part.get_content_type() == "application/gzip"
    assert part.get_filename() == filename(ENV)
    assert part.get_payload(decode=True) == gz


@pytest.mark.parametrize(
    "domain",
    ["x/y.attacker.test", "x\x01y.attacker.test", "x\r\nBcc: v@victim.test", "=?utf-8?b?SGk=?="],
)
def test_a_name_that_is_no_host_name_never_reaches_a_header_or_the_file_name(domain: str) -> None:
    """Recording already refuses such a policy domain (record.hostname); a row kept
    before it did, or any other way in, still makes no header of it."""
    env = dataclasses.replace(ENV, domain=domain)
    for make in (lambda: subject(env), lambda: filename(env), lambda: compose(env, "O", b"", 0)):
        with pytest.raises(ValueError, match="not a host name"):
            make()
    bad_id = dataclasses.replace(ENV, report_id="../x")
    with pytest.raises(ValueError, match="letters and digits"):
        filename(bad_id)
