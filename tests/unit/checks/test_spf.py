"""The SPF check against a dict resolver: each result, the identity checked, the
facts it leaves for DMARC, the verdict cache, and pyspf run on the loop once the
answers are in."""

from __future__ import annotations

import asyncio

import pytest

from gateway.address import parse_path
from gateway.checks.spf import SpfCheck
from gateway.context import Context
from gateway.facts import SpfFacts
from gateway.vocab import Stage
from tests.unit.fakes import TIMEOUT, DictResolver, a, txt

ZONE = {
    ("pass.test", "TXT"): txt("v=spf1 ip4:192.0.2.0/24 -all"),
    ("fail.test", "TXT"): txt("v=spf1 ip4:198.51.100.1 -all"),
    ("soft.test", "TXT"): txt("v=spf1 ~all"),
    ("neutral.test", "TXT"): txt("v=spf1 ?all"),
    ("perm.test", "TXT"): txt("v=spf1 ip4:nonsense -all"),
    ("two.test", "TXT"): txt("v=spf1 -all", "v=spf1 +all"),
    ("inc.test", "TXT"): txt("v=spf1 include:pass.test -all"),
    ("mx.test", "TXT"): txt("v=spf1 a:mail.mx.test -all"),
    ("mail.mx.test", "A"): a("192.0.2.7"),
    ("helo.test", "TXT"): txt("v=spf1 ip4:192.0.2.7 -all"),
    ("temp.test", "TXT"): TIMEOUT,
}


def run(sender: str, helo: str = "client.test", ip: str = "192.0.2.7",
        check: SpfCheck | None = None) -> tuple[tuple[str, ...], Context]:  # fmt: skip
    check = check or SpfCheck(DictResolver(ZONE))
    ctx = Context("s", ip, 1, "smtp", helo=helo)
    ctx.mail_from = parse_path(f"<{sender}>", allow_null=True)

    async def go() -> tuple[str, ...]:
        r = check.run(Stage.MAIL, ctx)
        return r if isinstance(r, tuple) else await r

    return asyncio.run(go()), ctx


@pytest.mark.parametrize(
    ("sender", "symbol"),
    [
        ("a@pass.test", "spf.pass"),
        ("a@fail.test", "spf.fail"),
        ("a@soft.test", "spf.softfail"),
        ("a@neutral.test", "spf.neutral"),
        ("a@nothing.test", "spf.none"),
        ("a@perm.test", "spf.permerror"),
        ("a@two.test", "spf.permerror"),  # RFC 7208 4.5: two records
        ("a@inc.test", "spf.pass"),
        ("a@mx.test", "spf.pass"),
        ("a@temp.test", "spf.temperror"),
        ("a@tld", "spf.none"),  # not multi-label: no lookup at all
    ],
)
def test_each_result(sender: str, symbol: str) -> None:
    symbols, ctx = run(sender)
    assert symbols == (symbol,)
    result = symbol.removeprefix("spf.")
    assert ctx.facts.spf == SpfFacts(sender.rpartition("@")[2], result)
    assert ctx.auth[-1].method == "spf" and ctx.auth[-1].result == result


def test_a_null_sender_is_checked_as_its_helo() -> None:
    """RFC 7208 2.4: for <>, the HELO identity; the fact names the HELO domain."""
    symbols, ctx = run("", helo="helo.test")
    assert symbols == ("spf.pass",)
    assert ctx.facts.spf == SpfFacts("helo.test", "pass")
    assert ctx.auth[-1].props == {"smtp.helo": "helo.test"}


def test_a_repeat_sender_is_answered_at_once_from_the_cache() -> None:
    res = DictResolver(ZONE)
    check = SpfCheck(res)
    run("a@inc.test", check=check)
    asked = len(res.asked)
    ctx = Context("s", "192.0.2.7", 1, "smtp", helo="client.test")
    ctx.mail_from = parse_path("<b@inc.test>")
    assert check.run(Stage.MAIL, ctx) == ("spf.pass",)  # a tuple: no coroutine, no wait
    assert len(res.asked) == asked
