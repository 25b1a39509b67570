"""What the DMARC report tests share: a context as a transaction leaves it, and rows."""

from __future__ import annotations

from gateway.address import Address
from gateway.context import Context
from gateway.dmarcreports.record import Policy, Row
from gateway.facts import DkimSignature, DmarcOutcome, PublishedPolicy, SpfFacts

RUA = "mailto:dmarc@own.test"


def published(rua: str = RUA, domain: str = "own.test", p: str = "reject") -> PublishedPolicy:
    return PublishedPolicy(domain, p, p, "r", "r", 100, "0", rua)


def context(
    result: str = "pass",
    *,
    disposition: str = "none",
    rua: str = RUA,
    recipients: tuple[str, ...] = ("example.test",),
    sender: Address | None = None,
    overrides: tuple[str, ...] = (),
    dkim_aligned: bool = True,
    spf_aligned: bool = False,
) -> Context:
    ctx = Context("s1", "192.0.2.7", 4000, "smtp", helo="mx.own.test")
    ctx.mail_from = sender if sender is not None else Address("bounces", "own.test")
    ctx.recipients = [Address("bob", d) for d in recipients]
    ctx.facts.spf = SpfFacts("own.test", "softfail")
    ctx.facts.dkim = (DkimSignature("own.test", "sel", "rsa-sha256", "pass"),)
    ctx.facts.dmarc = DmarcOutcome(
        result,
        disposition,
        "own.test",
        "reject",
        "",
        published(rua),
        spf_aligned=spf_aligned,
        dkim_aligned=dkim_aligned,
        overrides=overrides,
    )
    return ctx


POLICY = Policy("reject", "reject", "r", "r", 100, "0", RUA)


def row(ip: str = "192.0.2.7", disposition: str = "none", header_from: str = "own.test") -> Row:
    return Row(
        ip,
        disposition,
        "pass",
        "fail",
        (),
        header_from,
        "own.test",
        "example.test",
        (("own.test", "sel", "pass"),),
        ("own.test", "mfrom", "softfail"),
    )
