"""Relay control (gateway/checks/relay.py): what is local, and the routing tricks that never are."""

from __future__ import annotations

import pytest

from gateway.address import parse_path
from gateway.checks.relay import RelayCheck, relay_trick


@pytest.mark.parametrize(
    "path",
    [
        "<user%remote.test@example.test>",
        '<"user@remote.test"@example.test>',
        "<@example.test:user@remote.test>",
        "<remote.test!user@example.test>",
        "<user@[127.0.0.1]>",
    ],
)
def test_relay_tricks(path: str) -> None:
    a = parse_path(path)
    assert relay_trick(a)
    assert not RelayCheck(["example.test"]).is_local(a)


def test_local_domain_wildcards() -> None:
    check = RelayCheck(["example.test", "*.corp.test"])
    assert check.is_local(parse_path("<a@example.test>"))
    assert check.is_local(parse_path("<a@x.y.corp.test>"))
    assert not check.is_local(parse_path("<a@corp.test>"))
    assert not check.is_local(parse_path("<a@evilcorp.test>"))
    assert not check.is_local(parse_path("<a@example.test.>"))
