"""Client addresses and networks (gateway/net.py): one spelling per client, and the
one test of "is this client in these networks"."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.net import network_matcher, network_of, plain_ip


@pytest.mark.parametrize(
    ("ip", "network"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("198.51.100.0", "198.51.100.0/24"),
        ("2001:db8:1:2:3::4", "2001:db8:1:2::/64"),
        ("2001:db8::1", "2001:db8::/64"),
    ],
)
def test_network_of_is_the_24_or_the_64(ip: str, network: str) -> None:
    assert network_of(ip) == network


def test_network_of_takes_other_prefixes() -> None:
    assert network_of("192.0.2.77", v4=16) == "192.0.0.0/16"
    assert network_of("2001:db8:1:2:3::4", v6=48) == "2001:db8:1::/48"


@pytest.mark.parametrize(
    ("ip", "plain"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),  # what a dual-stack listener sees
        ("::FFFF:198.51.100.7", "198.51.100.7"),
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::1", "::1"),
        ("not an address", "not an address"),
        ("zz::ffff:1.2.3.4", "zz::ffff:1.2.3.4"),  # not parsable: unchanged, no error
    ],
)
def test_plain_ip_names_an_ipv4_client_one_way(ip: str, plain: str) -> None:
    assert plain_ip(ip) == plain


def test_network_matcher_counts_mapped_addresses_as_ipv4_and_refuses_garbage() -> None:
    nets = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")]
    inside = network_matcher(nets)
    assert inside("192.0.2.200")
    assert inside("::ffff:192.0.2.200")
    assert inside("2001:db8:ffff::1")
    assert not inside("192.0.3.1")
    assert not inside("::ffff:192.0.3.1")
    assert not inside("")
    assert not inside("192.0.2.300")
    assert not network_matcher([])("192.0.2.1")
