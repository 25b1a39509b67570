"""What makes two delivery attempts the same greylist triplet
(gateway/checks/greylist_keys.py): the sender normalised, the client's network or its
SPF-authenticated domain."""

from __future__ import annotations

import pytest

from gateway.address import Address, parse_path
from gateway.checks.greylist_keys import (
    network_key,
    origin,
    recipient_key,
    sender_key,
    triplet_key,
)
from gateway.facts import SpfFacts


def addr(text: str) -> Address:
    return parse_path(f"<{text}>", allow_null=True)


@pytest.mark.parametrize(
    ("sender", "key"),
    [
        ("Alice@Sender.TEST", "alice@sender.test"),
        ("alice+newsletter@sender.test", "alice@sender.test"),
        ("", "<>"),
        # SRS: the original sender, whatever the forwarder's hash and day stamp.
        ("SRS0=HHH1=TT=orig.test=alice@fwd.test", "alice@orig.test"),
        ("srs0+XyZ=AB=orig.test=alice@fwd.test", "alice@orig.test"),
        ("SRS1=H2=fwd1.test==H3=TT=orig.test=alice@fwd2.test", "alice@orig.test"),
        # BATV: a tag new for every message.
        ("prvs=1234abcdef=alice@sender.test", "alice@sender.test"),
        ("msprvs1=19823ggaiK6sY=bounces-12@sender.test", "bounces-#@sender.test"),
        # VERP and list bounces: numbers and hashes per message.
        ("bounce-12345-678@list.test", "bounce-#-#@list.test"),
        ("bounces+99.1@list.test", "bounces@list.test"),
        ("mc-a8f3k29xq0b1z@esp.test", "mc-#@esp.test"),
        ("john2000@sender.test", "john2000@sender.test"),  # a short name with digits stays
    ],
)
def test_sender_normalisation(sender: str, key: str) -> None:
    assert sender_key(addr(sender)) == key


def test_srs_and_batv_forms_of_one_sender_are_one_triplet() -> None:
    forms = [
        "alice@orig.test",
        "SRS0=abcd=AB=orig.test=alice@fwd.test",
        "SRS0=wxyz=AC=orig.test=alice@fwd.test",  # the next day's stamp
        "prvs=0012abcdef=alice@orig.test",
        "prvs=9999zzzzzz=alice@orig.test",
    ]
    assert {sender_key(addr(f)) for f in forms} == {"alice@orig.test"}


def test_origin_is_the_network_or_the_spf_authenticated_domain() -> None:
    assert origin("192.0.2.77", None) == "192.0.2.0/24"
    assert origin("2001:db8:1:2:3::4", None) == "2001:db8:1:2::/64"
    assert origin("192.0.2.77", None, v4=16) == "192.0.0.0/16"
    assert origin("192.0.2.77", SpfFacts("sender.test", "pass")) == "spf:sender.test"
    assert origin("192.0.2.77", SpfFacts("sender.test", "softfail")) == "192.0.2.0/24"
    assert origin("192.0.2.77", SpfFacts("sender.test", "pass"), use_spf=False) == "192.0.2.0/24"


def test_keys_name_origin_sender_and_recipient() -> None:
    rcpt = recipient_key(addr("Bob@Example.TEST"))
    assert rcpt == "bob@example.test"
    key = triplet_key("192.0.2.0/24", sender_key(addr("a+x@s.test")), rcpt)
    assert key == "grey:t:192.0.2.0/24|a@s.test|bob@example.test"
    assert network_key("192.0.2.77") == "grey:n:192.0.2.0/24"
    assert network_key("2001:db8::1", v6=48) == "grey:n:2001:db8::/48"
