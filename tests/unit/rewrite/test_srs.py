"""The Sender Rewriting Scheme (gateway/rewrite/srs.py): round trips, forged and expired
addresses, secret rotation."""

from __future__ import annotations

import pytest

from gateway.rewrite.srs import Srs, SrsError


class Clock:
    def __init__(self) -> None:
        self.t = 1_795_000_000.0

    def __call__(self) -> float:
        return self.t


def test_srs_forward_reverse_round_trip_and_double_forward() -> None:
    clock = Clock()
    srs = Srs("srs.example.org", ["new", "old"], clock=clock)
    local = srs.forward("user", "orig.test")
    assert local.startswith("SRS0=") and local.endswith("=orig.test=user")
    assert srs.reverse(local) == ("user", "orig.test")
    assert srs.reverse(local.lower()) == ("user".lower(), "orig.test")  # case folded en route
    # A second forwarder (hop2) of our SRS0 address makes SRS1; its bounce comes to
    # hop2, which reverses to our SRS0; ours reverses to the original.
    hop2 = Srs("hop2.test", ["other"], clock=clock)
    srs1 = hop2.forward(local, "srs.example.org")
    assert srs1.startswith("SRS1=") and "=srs.example.org==" in srs1
    back_local, back_domain = hop2.reverse(srs1)
    assert back_domain == "srs.example.org"
    assert srs.reverse(back_local) == ("user", "orig.test")


def test_srs_hash_cannot_be_moved_across_the_domain_local_boundary() -> None:
    """Hashed run together, "bank.co" + "mceo" and "bank.com" + "ceo" were the same
    input: one address issued for mceo@bank.co reversed, re-split, to ceo@bank.com."""
    srs = Srs("srs.example.org", ["k"], clock=Clock())
    issued = srs.forward("mceo", "bank.co")
    _, h, tt, _, _ = issued.split("=")
    with pytest.raises(SrsError, match="hash"):
        srs.reverse(f"SRS0={h}={tt}=bank.com=ceo")
    assert srs.reverse(issued) == ("mceo", "bank.co")


def test_srs_tampered_expired_and_rotated() -> None:
    clock = Clock()
    old = Srs("srs.example.org", ["old"], clock=clock)
    made_with_old = old.forward("user", "orig.test")
    rotated = Srs("srs.example.org", ["new", "old"], clock=clock)
    assert rotated.reverse(made_with_old) == ("user", "orig.test")  # old secret verifies
    assert rotated.forward("user", "orig.test") != made_with_old  # new secret signs
    dropped = Srs("srs.example.org", ["new"], clock=clock)
    with pytest.raises(SrsError, match="hash"):
        dropped.reverse(made_with_old)
    parts = made_with_old.split("=")
    with pytest.raises(SrsError, match="hash"):
        rotated.reverse("=".join([*parts[:4], "attacker"]))  # a different user
    with pytest.raises(SrsError, match="hash"):
        rotated.reverse("=".join([parts[0], "AAAA", *parts[2:]]))
    clock.t += 22 * 86400
    with pytest.raises(SrsError, match="expired"):
        rotated.reverse(made_with_old)
    with pytest.raises(SrsError, match="malformed"):
        rotated.reverse("SRS0=onlytwo=parts")


def test_srs_hash_is_case_free_base32_of_the_configured_length() -> None:
    srs = Srs("srs.example.org", ["k"], clock=Clock())
    hash_ = srs.forward("user", "orig.test").split("=")[1]
    assert len(hash_) == 12 and set(hash_) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    short = Srs("srs.example.org", ["k"], clock=Clock(), hash_length=8)
    local = short.forward("user", "orig.test")
    assert len(local.split("=")[1]) == 8
    with pytest.raises(SrsError, match="hash"):  # a hash of the other length never verifies
        srs.reverse(local)
