"""What the sender-authentication checks find in one transaction, typed.

Each check owns one field of `Facts` and is the only one to set it; a check that
reads another's field names that check in its `requires`, and the runner orders
the checks so that every requirement has run first (pipeline/runner.py). A field
still at its default was not found: the check is disabled, skipped (trusted or
allow-listed client) or, if its name is in `incomplete`, crashed or ran out of
time, which DMARC must not read as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.vocab import AuthResult


@dataclass(frozen=True, slots=True)
class SpfFacts:
    """The SPF verdict for the identity checked: MAIL FROM's domain, or the HELO
    name for a null sender (RFC 7208 2.4)."""

    domain: str
    result: str  # pass, fail, softfail, neutral, none, temperror, permerror


@dataclass(frozen=True, slots=True)
class DkimSignature:
    domain: str
    selector: str
    algorithm: str
    result: str
    reason: str = ""
    body_length: int | None = None
    b: str = ""

    def auth_result(self) -> AuthResult:
        props = {"header.d": self.domain, "header.s": self.selector, "header.a": self.algorithm}
        if self.b:
            props["header.b"] = self.b[:8]
        reason = self.reason
        if self.body_length is not None:
            reason = f"{reason}; l={self.body_length}".lstrip("; ")
        return AuthResult("dkim", self.result, props, reason)


@dataclass(frozen=True, slots=True)
class ArcFacts:
    result: str  # pass, fail, none, temperror
    sealer: str | None = None  # the newest ARC-Seal's d=, when it could be read


@dataclass(frozen=True, slots=True)
class PublishedPolicy:
    """The DMARC record an evaluation applied, as an aggregate report shows it
    (RFC 7489 Appendix C, policy_published), with where the domain asks for its
    reports (`rua`, as written: dmarcreports/rua.py reads and bounds it)."""

    domain: str  # where the record was found
    p: str
    sp: str  # the subdomain policy in force: sp=, else p= (RFC 7489 6.3)
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    fo: str = "0"
    rua: str = ""


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    result: str  # pass, fail, none, temperror, permerror
    disposition: str = "none"  # none, quarantine, reject (what the policy asks, after pct/t)
    from_domain: str = ""
    policy: str = ""  # the applicable p/sp/np value before sampling
    reason: str = ""
    # For aggregate reports: the record applied, which identifiers aligned with a
    # pass, and why the disposition asked is weaker than the policy (sampled_out by
    # pct, testing by t=y, trusted_forwarder by a trusted sealer's ARC chain).
    published: PublishedPolicy | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ScanFacts:
    """What one content scanner (checks/scanner.py) made of the message: for the
    transaction's log line and `smtp-gateway check`, never a metric label or reply."""

    scanner: str  # the check's name: clamav, rspamd
    verdict: str  # clean, infected, spam, ...; or unavailable, timeout, too_big, skipped
    detail: str = ""  # a signature name, a score, an error: operators' eyes only
    symbols: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Changes Rspamd asks for in the message's header section (its reply's `milter`
    block and rewritten subject): bounded and sanitised by checks/rspamd_protocol.py,
    filtered by the policy (checks.rspamd), applied by headers.compose, which never
    lets one of them speak in our name."""

    add: tuple[tuple[str, str], ...] = ()  # (field name, value: folded, ASCII)
    # (field name, which: 0 every one, N the Nth from the top, -N from the bottom)
    remove: tuple[tuple[str, int], ...] = ()
    subject: str | None = None  # the new Subject value


@dataclass(frozen=True, slots=True)
class RspamdFacts:
    """Rspamd's verdict on the message (checks/rspamd.py)."""

    action: str  # as Rspamd spells it: reject, soft reject, add header, no action, ...
    score: float
    required: float
    symbols: tuple[tuple[str, float], ...] = ()  # the strongest symbols, with their scores
    edits: HeaderEdits = HeaderEdits()
    # Whether our X-Spam-* fields (headers.compose) go on the message.
    spam_headers: bool = True


@dataclass(slots=True)
class Facts:
    """One transaction's findings, made new at MAIL with the transaction."""

    spf: SpfFacts | None = None
    dkim: tuple[DkimSignature, ...] = ()
    arc: ArcFacts | None = None
    dmarc: DmarcOutcome | None = None
    # One entry per content scanner that looked at (or skipped) the message.
    scans: tuple[ScanFacts, ...] = ()
    rspamd: RspamdFacts | None = None
    # Checks that crashed or ran out of time (set by the runner): their facts are
    # missing, and what builds on them must not read the gap as a failure.
    incomplete: frozenset[str] = field(default_factory=frozenset)
