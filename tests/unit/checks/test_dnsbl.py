"""The DNSBL check against a dict resolver: listings and their codes, weights and
the threshold, allow lists, the reply detail, temporary errors, unhealthy zones."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.address import parse_path
from gateway.checks.dnsbl import DnsblCheck
from gateway.context import Context
from gateway.pipeline.policy import Policy
from gateway.vocab import Stage
from tests.unit.fakes import TIMEOUT, DictResolver, a, txt

IP = "192.0.2.99"
REV = "99.2.0.192"


def check(zone: dict[Any, Any], zones: list[dict[str, Any]], **opts: Any) -> DnsblCheck:
    options = Policy.model_validate({"checks": {"dnsbl": {"zones": zones, **opts}}}).checks.dnsbl
    return DnsblCheck(DictResolver(zone)).configured(options)


def run(c: DnsblCheck, stage: Stage = Stage.CONNECT, **ctx_fields: Any) -> tuple[Any, Context]:
    ctx = Context("s", IP, 1, "smtp", **ctx_fields)

    async def go() -> tuple[str, ...]:
        r = c.run(stage, ctx)
        return r if isinstance(r, tuple) else await r

    return asyncio.run(go()), ctx


def test_a_listed_client_with_the_zones_reason() -> None:
    c = check({(f"{REV}.bl.test", "A"): a("127.0.0.2"),
               (f"{REV}.bl.test", "TXT"): txt("listed for spam, see bl.test")},
              [{"name": "bl", "zone": "bl.test"}])  # fmt: skip
    symbols, ctx = run(c)
    assert symbols == ("dnsbl.listed",)
    assert ctx.details["dnsbl.listed"] == "bl.test: listed for spam, see bl.test"
    assert ctx.dnsbl_hits == ["bl"]


def test_reply_text_hides_the_zone() -> None:
    paid = {"name": "paid", "zone": "key123.bl.test", "reply_text": "a paid list"}
    c = check({(f"{REV}.key123.bl.test", "A"): a("127.0.0.2")}, [paid])
    symbols, ctx = run(c)
    assert symbols == ("dnsbl.listed",) and ctx.details["dnsbl.listed"] == "a paid list"


def test_codes_weights_and_threshold() -> None:
    zone = {(f"{REV}.one.test", "A"): a("127.0.0.4"), (f"{REV}.two.test", "A"): a("127.0.0.10")}
    zones = [
        {"name": "one", "zone": "one.test", "weight": 0.5, "codes": ["bitmask:0x04"]},
        {"name": "two", "zone": "two.test", "weight": 0.5, "codes": ["127.0.0.8/29"]},
    ]
    assert run(check(zone, zones))[0] == ("dnsbl.listed",)  # 0.5 + 0.5 reaches 1
    assert run(check(zone, zones, threshold=1.5))[0] == ()
    zones[1]["codes"] = ["127.0.0.2"]  # 127.0.0.10 is not among them
    assert run(check(zone, zones))[0] == ()


def test_an_error_code_is_not_a_listing() -> None:
    """127.255.255.254 and the like: a public resolver or a quota, not a listing."""
    c = check({(f"{REV}.bl.test", "A"): a("127.255.255.254")}, [{"name": "bl", "zone": "bl.test"}])
    assert run(c)[0] == ("dnsbl.temperror",)


def test_allow_lists_and_allow_networks() -> None:
    c = check({(f"{REV}.wl.test", "A"): a("127.0.0.2")},
              [{"name": "wl", "zone": "wl.test", "weight": -1}])  # fmt: skip
    symbols, ctx = run(c)
    assert symbols == ("dnsbl.allowed",) and ctx.allowlisted
    c = check({}, [], allow_networks=["192.0.2.0/24"])
    symbols, ctx = run(c)
    assert symbols == ("dnsbl.allowed",) and ctx.allowlisted


def test_a_zone_that_does_not_answer_is_a_temperror_not_a_pass() -> None:
    c = check({(f"{REV}.bl.test", "A"): TIMEOUT}, [{"name": "bl", "zone": "bl.test"}])
    assert run(c)[0] == ("dnsbl.temperror",)


def test_helo_and_sender_domain_zones_at_their_stages() -> None:
    zone = {
        ("bad.example.dbl.test", "A"): a("127.0.1.2"),
        ("spam.test.dbl.test", "A"): a("127.0.1.2"),
    }
    zones = [{"name": "h", "zone": "dbl.test", "type": "helo"},
             {"name": "m", "zone": "dbl.test", "type": "mail_from"}]  # fmt: skip
    c = check(zone, zones)
    assert run(c, Stage.HELO, helo="bad.example")[0] == ("dnsbl.listed",)
    assert run(c, Stage.HELO, helo="[192.0.2.1]")[0] == ()  # an address literal is no name
    ctx_sender = parse_path("<x@spam.test>")
    symbols, ctx = run(c, Stage.MAIL, mail_from=ctx_sender)
    assert symbols == ("dnsbl.listed",) and ctx.dnsbl_score == 0  # for this transaction only


def test_an_unhealthy_zone_is_skipped() -> None:
    c = check({(f"{REV}.bl.test", "A"): a("127.0.0.2")}, [{"name": "bl", "zone": "bl.test"}])
    c.zones[0].healthy = False
    assert run(c)[0] == ()
