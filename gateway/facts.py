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
class DmarcOutcome:
    result: str  # pass, fail, none, temperror, permerror
    disposition: str = "none"  # none, quarantine, reject (what the policy asks, after pct/t)
    from_domain: str = ""
    policy: str = ""  # the applicable p/sp/np value before sampling
    reason: str = ""


@dataclass(slots=True)
class Facts:
    """One transaction's findings, made new at MAIL with the transaction."""

    spf: SpfFacts | None = None
    dkim: tuple[DkimSignature, ...] = ()
    arc: ArcFacts | None = None
    dmarc: DmarcOutcome | None = None
    # Checks that crashed or ran out of time (set by the runner): their facts are
    # missing, and what builds on them must not read the gap as a failure.
    incomplete: frozenset[str] = field(default_factory=frozenset)
