"""What a client's recipient becomes before the backend sees it
(gateway/smtp/recipients.py): SRS reversed for bounces only, aliases expanded, and the
refusals: a forged SRS address (counted per client), a loop, a relay trick."""

from __future__ import annotations

from pathlib import Path

from gateway import replies
from gateway.address import Address, parse_path
from gateway.rewrite.engine import Rewriter
from gateway.rewrite.options import RewriteOptions
from gateway.smtp.guard import FailureLimit
from gateway.smtp.recipients import expand

SRS = {"enabled": True, "domain": "srs.example.org", "secrets": ["k"]}


def a(text: str) -> Address:
    return parse_path(f"<{text}>")


def rewriter(**opts: object) -> Rewriter:
    return Rewriter(RewriteOptions.model_validate(opts), Path("."))


def run(rw: Rewriter, rcpt: str, *, bounce: bool = True, guard: FailureLimit | None = None,
        ip: str = "192.0.2.7") -> replies.Reply | list[str]:  # fmt: skip
    out = expand(rw, a(rcpt), a(rcpt), client_ip=ip, bounce=bounce,
                 srs_failures=guard or FailureLimit(), session_id="s1")  # fmt: skip
    return out if isinstance(out, replies.Reply) else [str(x) for x in out]


def test_aliases_expand_to_their_members() -> None:
    rw = rewriter(virtual_alias={"rules": {"team@example.org": ["a@example.org", "b@example.org"]}})
    assert run(rw, "team@example.org") == ["a@example.org", "b@example.org"]
    assert run(rw, "other@example.org") == ["other@example.org"]


def test_a_bounce_to_our_srs_address_goes_to_the_original_sender() -> None:
    rw = rewriter(srs=SRS)
    srs = str(rw.srs_forward(a("joe@orig.test")))
    assert run(rw, srs) == ["joe@orig.test"]
    # Not a bounce: an SRS address takes bounces only (else it is a way to relay).
    assert run(rw, srs, bounce=False) is replies.SRS_INVALID


def test_forged_srs_addresses_are_refused_then_no_longer_checked_for_that_client() -> None:
    rw = rewriter(srs=SRS)
    guard = FailureLimit(limit=2)
    forged = "SRS0=AAAAAAAAAAAA=AA=orig.test=user@srs.example.org"
    assert run(rw, forged, guard=guard) is replies.SRS_INVALID
    assert run(rw, forged, guard=guard) is replies.SRS_INVALID
    assert run(rw, forged, guard=guard) is replies.SRS_LIMITED  # 4xx: not a verdict on it
    good = str(rw.srs_forward(a("joe@orig.test")))
    assert run(rw, good, guard=guard) is replies.SRS_LIMITED  # not even a good one
    assert run(rw, "plain@example.org", guard=guard) == ["plain@example.org"]
    assert run(rw, forged, guard=guard, ip="198.51.100.1") is replies.SRS_INVALID  # others


def test_an_alias_loop_is_refused() -> None:
    rw = rewriter(virtual_alias={"rules": {"a@example.org": "b@example.org",
                                           "b@example.org": "a@example.org"}})  # fmt: skip
    assert run(rw, "a@example.org") is replies.ALIAS_LOOP


def test_an_alias_that_would_make_a_relay_trick_is_refused_as_relaying() -> None:
    """Relay control judged the alias; its targets must not route elsewhere."""
    rw = rewriter(virtual_alias={"rules": {"x@example.org": "user%remote.test@example.org"}})
    out = run(rw, "x@example.org")
    assert isinstance(out, replies.Reply)
    assert (out.code, out.enhanced, out.reason) == (550, "5.7.1", "relay.denied")
