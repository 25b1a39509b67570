"""`smtp-gateway greylist show|allow|reset` (gateway/greylist_admin.py) and the
gateway's loopback-only routes behind it (gateway/http.py): what an operator types
becomes the check's keys; each entry is one line an operator can act on; nobody off
loopback reaches the state."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from gateway import config
from gateway.checks.greylist import GreylistOptions, params_of
from gateway.greylist_admin import Target, describe, run
from gateway.http import HttpEndpoint
from gateway.store import greylist_for
from gateway.store.greylist import GreyEntry
from gateway.store.memory import MemoryStore
from tests.unit.fakes import Clock

OPTS = GreylistOptions(enabled=True, delay=300)
P = params_of(OPTS)


def test_a_client_is_its_network_and_addresses_are_normalised_as_the_check_does() -> None:
    t = Target("192.0.2.77", "Bounce-1234+x@List.TEST", "Bob@Example.ORG", OPTS)
    assert t.queries() == [
        ("t:192.0.2.0/24|bounce-#@list.test|bob@example.org", True),
        ("t:spf:list.test|bounce-#@list.test|bob@example.org", True),
    ]
    assert t.allowed_keys() == [
        "t:192.0.2.0/24|bounce-#@list.test|bob@example.org",
        "t:spf:list.test|bounce-#@list.test|bob@example.org",
    ]
    assert Target("2001:db8::1", None, None, OPTS).queries() == [
        ("n:2001:db8::/64", True),
        ("t:2001:db8::/64|", False),
    ]
    assert Target("spf:Example.COM", "<>", None, OPTS).queries() == [
        ("t:spf:example.com|<>|", False)
    ]
    no_spf = GreylistOptions(spf_origin=False, network_prefix_v4=16)
    assert Target("192.0.2.77", "a@b.test", None, no_spf).queries() == [
        ("t:192.0.0.0/16|a@b.test|", False)
    ]
    with pytest.raises(config.ConfigError, match="IP address, a network or spf:DOMAIN"):
        Target("mail.example.com", None, None, OPTS)


def test_each_entry_is_one_line_saying_what_happens_next() -> None:
    pending = GreyEntry("t:192.0.2.0/24|a@s.test|b@e.test", "pending", 42, 2 * 86400 - 42)
    assert describe(pending, P) == (
        "t:192.0.2.0/24|a@s.test|b@e.test: pending, first attempt 42s ago, "
        "a retry passes in 258s, forgotten in 48.0 h"
    )
    due = pending._replace(age=400)
    assert "a retry passes now" in describe(due, P)
    white = GreyEntry("t:spf:s.test|a@s.test|b@e.test", "whitelisted", 3 * 3600, 35 * 86400)
    assert describe(white, P) == (
        "t:spf:s.test|a@s.test|b@e.test: whitelisted, passed 3.0 h ago, expires in 35.0 days"
    )
    net = GreyEntry("n:192.0.2.0/24", "network", 0, 600, passes=3)
    assert describe(net, P) == (
        "n:192.0.2.0/24: 3 pass(es), not yet auto-whitelisted (5 needed), forgotten in 10 min"
    )
    assert "auto-whitelisted," in describe(net._replace(passes=5), P)


def test_a_key_is_shown_with_what_the_client_chose_escaped() -> None:
    """A sender with a right-to-left override, a zero-width space or a Cyrillic
    letter must not pass, on an operator's terminal, for another address."""
    tricky = GreyEntry(
        "t:192.0.2.0/24|ceo@b\u0430nk.test|x\u202eliame@e.test|\u200b", "pending", 1, 9
    )
    line = describe(tricky, P)
    assert line.isascii() and line.isprintable()
    assert "ceo@b\\u0430nk.test" in line and "x\\u202eliame" in line and "\\u200b" in line
    plain = GreyEntry("t:192.0.2.0/24|a@s.test|b@e.test", "pending", 1, 9)
    assert describe(plain, P).startswith("t:192.0.2.0/24|a@s.test|b@e.test: ")


def test_allow_refuses_what_would_not_be_honoured(tmp_path: Path) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump({"checks": {"greylist": {"auto_whitelist": {"after": 0}}}}))
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"policy": str(pol)}))
    with pytest.raises(config.ConfigError, match=r"auto_whitelist\.after is 0"):
        run("allow", "192.0.2.7", None, None, str(cfg))
    with pytest.raises(config.ConfigError, match="a whole triplet"):
        run("allow", "192.0.2.7", "a@s.test", None, str(cfg))
    with pytest.raises(config.ConfigError, match="needs a whole triplet"):
        run("allow", "spf:s.test", None, None, str(cfg))


def test_greylist_routes_are_for_loopback_operators_only() -> None:
    store = MemoryStore(Clock())
    grey = greylist_for(store)
    assert greylist_for(store) is grey  # the check's and the routes' are one
    grey.judge("grey:n:192.0.2.0/24", ["grey:t:192.0.2.0/24|a@s.test|b@e.test"], P)
    ep = HttpEndpoint(lambda: (True, {}), store)

    def route(method: str, target: str, peer: str = "127.0.0.1") -> tuple[int, bytes]:
        status, _, body = asyncio.run(ep.route(method, target, peer))
        return status, body

    assert route("GET", "/greylist?key=t:", peer="192.0.2.9")[0] == 403
    assert route("POST", "/greylist/allow?key=n:192.0.2.0/24", peer="10.0.0.1")[0] == 403
    assert route("POST", "/greylist/reset?key=t:", peer="192.0.2.9")[0] == 403
    assert route("GET", "/greylist")[0] == 400
    assert route("POST", "/greylist?key=t:")[0] == 405
    assert route("GET", "/greylist/reset?key=t:")[0] == 405
    assert route("POST", "/greylist/allow?key=n:192.0.2.0/24")[0] == 400  # no ttl given
    status, body = route("GET", "/greylist?key=t:192.0.2.0/24|")
    [e] = json.loads(body)["entries"]
    assert status == 200 and (e["key"], e["state"]) == (
        "t:192.0.2.0/24|a@s.test|b@e.test",
        "pending",
    )
    allow = "/greylist/allow?key=n:192.0.2.0/24&ttl=3110400&after=5&awl_ttl=604800"
    assert route("POST", allow)[0] == 200
    status, body = route("GET", "/greylist?key=n:192.0.2.0/24&exact=1")
    [e] = json.loads(body)["entries"]
    assert (e["state"], e["passes"]) == ("network", 5)
    status, body = route("POST", "/greylist/reset?key=t:")
    assert status == 200 and json.loads(body)["deleted"] == 1
