"""The mail that carries one report (RFC 7489 7.2.1.1): a multipart/mixed message
with a short text part and the gzipped XML as an application/gzip attachment named
<receiver>!<policy-domain>!<begin>!<end>!<report-id>.xml.gz, under the subject
"Report Domain: <domain> Submitter: <receiver> Report-ID: <<report-id>>".

The receiver (Submitter) is the domain of the reports' From address. The report id
is letters and digits only, as the file name's unique-id must be (RFC 7489's ABNF).

The policy domain is a DNS name its owner chose, and a DNS name may hold "/",
controls, anything: the Subject, the Message-ID and the file name are made only of
names that are host names (record.hostname, as recording requires) and a report
id of letters and digits; anything else raises ValueError, never a header with
what a sender put in it.
"""

from __future__ import annotations

import email.policy
import email.utils
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage

from gateway.dmarcreports.record import hostname


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str  # the reports' From (dmarc_reports.email)
    rcpt: str
    domain: str  # the policy domain
    report_id: str
    begin: int
    end: int


def receiver(sender: str) -> str:
    return sender.rpartition("@")[2].lower()


def _names(env: Envelope) -> tuple[str, str]:
    """The policy domain and the receiver, checked: host names both, and the report
    id letters and digits."""
    rcv = receiver(env.sender)
    if not hostname(env.domain):
        raise ValueError(f"the policy domain {env.domain!r} is not a host name")
    if not hostname(rcv, underscore=True):  # ours: config.py allows underscores
        raise ValueError(f"the receiver {rcv!r} (dmarc_reports.email) is not a host name")
    if not (env.report_id.isascii() and env.report_id.isalnum()):
        raise ValueError(f"the report id {env.report_id!r} is not letters and digits")
    return env.domain, rcv


def filename(env: Envelope) -> str:
    domain, rcv = _names(env)
    return f"{rcv}!{domain}!{env.begin}!{env.end}!{env.report_id}.xml.gz"


def subject(env: Envelope) -> str:
    domain, rcv = _names(env)
    return f"Report Domain: {domain} Submitter: {rcv} Report-ID: <{env.report_id}>"


def compose(env: Envelope, org_name: str, gz: bytes, now: float) -> bytes:
    """The message, CRLF line ends, ready for DATA once dot-stuffed."""
    domain, rcv = _names(env)
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = env.sender
    msg["To"] = env.rcpt
    msg["Subject"] = subject(env)
    msg["Date"] = email.utils.formatdate(now, usegmt=True)
    msg["Message-ID"] = f"<{env.report_id}.{domain}@{rcv}>"
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to a report
    first = datetime.fromtimestamp(env.begin, UTC).strftime("%Y-%m-%d %H:%M")
    last = datetime.fromtimestamp(env.end, UTC).strftime("%Y-%m-%d %H:%M:%S")
    msg.set_content(
        f"This is a DMARC aggregate report from {org_name} for {domain},\n"
        f"covering {first} to {last} UTC (report {env.report_id}).\n"
    )
    msg.add_attachment(gz, maintype="application", subtype="gzip", filename=filename(env))
    return msg.as_bytes()
