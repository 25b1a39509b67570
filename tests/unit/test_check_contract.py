"""The check contract: typed options owned by each check, configuration that makes
new objects (a reload never changes a running transaction's checks), an order
derived from what each check requires, and the runner as the checks' only clock."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from gateway import config
from gateway.address import parse_path
from gateway.checks.arc import ArcCheck
from gateway.checks.base import Configurable
from gateway.checks.dkim import DkimCheck
from gateway.checks.dmarc import DmarcCheck
from gateway.checks.dnsbl import DnsblCheck
from gateway.checks.ratelimit import RateLimitCheck
from gateway.checks.registry import CHECK_CLASSES
from gateway.checks.scanner import Scanner
from gateway.checks.spf import SpfCheck
from gateway.checks.tlspolicy import TlsPolicyCheck
from gateway.context import Context
from gateway.dns import DnsAnswer, DnsStatus, Resolver
from gateway.pipeline.policy import CheckOptions, Policy
from gateway.pipeline.runner import Runner, in_order
from gateway.vocab import Stage


class Silent(Resolver):
    """A resolver that has nothing cached and whose lookups never answer (a DNS
    server that dropped the packets), except for names given in `known`."""

    def __init__(self, known: dict[tuple[str, str], DnsAnswer] | None = None) -> None:
        super().__init__(config.Dns(nameservers=["127.0.0.1:9"]))
        self.known = known or {}
        self.asked: list[tuple[str, str]] = []

    def cached(self, name: str, rdtype: str) -> DnsAnswer | None:
        return self.known.get((name.lower(), rdtype))

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        self.asked.append((name.lower(), rdtype))
        if (name.lower(), rdtype) in self.known:
            return self.known[(name.lower(), rdtype)]
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def resolver() -> Resolver:
    return Silent()


def test_every_check_owns_the_type_of_its_options() -> None:
    """Each `checks.<name>` section of the policy is validated by the type that the
    check's own module defines, and each check with options takes them through
    `configured`."""
    for name, fld in CheckOptions.model_fields.items():
        cls = next(c for c in CHECK_CLASSES if c.name == name)
        assert fld.annotation is not None
        assert fld.annotation.__module__ == cls.__module__, name
        assert isinstance(_instance(cls), Configurable), name


def _instance(cls: Any) -> Any:
    if cls is RateLimitCheck:
        return cls()
    if cls is TlsPolicyCheck:
        return cls()
    if cls.__name__ == "GreylistCheck":  # its store, not a resolver: in memory by default
        return cls()
    if cls.__name__ == "RelayCheck":
        return cls(["example.test"])
    if issubclass(cls, Scanner):  # content scanners: no resolver, their options only
        return cls()
    return cls(resolver())


def test_a_reload_makes_new_checks_and_leaves_the_running_ones_alone() -> None:
    """A transaction holds the view of its MAIL: after a reload, its checks still
    have the options they had (a change in place would reach it mid-transaction)."""
    dkim = DkimCheck(resolver(), threads=1)
    tls = TlsPolicyCheck()
    try:
        r = Runner([dkim, tls], Policy())
        before = r.view
        r.swap_policy(
            Policy.model_validate(
                {"checks": {"dkim": {"max_signatures": 2}, "tls": {"require_tls_from": ["a.test"]}}}
            )
        )
        after = r.view
        old_dkim = before.by_stage[Stage.DATA][0].check
        new_dkim = after.by_stage[Stage.DATA][0].check
        assert isinstance(old_dkim, DkimCheck) and isinstance(new_dkim, DkimCheck)
        assert (old_dkim.max_signatures, new_dkim.max_signatures) == (5, 2)
        assert new_dkim is not old_dkim and new_dkim.pool is old_dkim.pool  # threads shared
        assert before.by_stage[Stage.MAIL] == []  # no TLS rule before the reload ...
        assert [s.name for s in after.by_stage[Stage.MAIL]] == ["tls"]  # ... one after
        assert (dkim.max_signatures, tls.from_domains.__bool__()) == (5, False)
    finally:
        dkim.close()


def test_dnsbl_zone_health_survives_a_reload_that_keeps_the_zone() -> None:
    check = DnsblCheck(resolver())
    zone = {"name": "bl", "zone": "bl.test"}
    first = check.configured(
        Policy.model_validate({"checks": {"dnsbl": {"zones": [zone]}}}).checks.dnsbl
    )
    first.zones[0].healthy = False
    kept = check.configured(
        Policy.model_validate({"checks": {"dnsbl": {"zones": [zone], "threshold": 2}}}).checks.dnsbl
    )
    assert kept.zones[0].healthy is False and kept.threshold == 2 and first.threshold == 1
    assert check.health() == {"bl": False}  # what the health checks see: the latest zones
    changed = check.configured(
        Policy.model_validate(
            {"checks": {"dnsbl": {"zones": [{**zone, "zone": "other.test"}]}}}
        ).checks.dnsbl
    )
    assert changed.zones[0].cfg.zone == "other.test" and changed.zones[0].healthy is False
    assert first.zones[0].cfg.zone == "bl.test"  # the old view's zone is as it was


class Named:
    """A check known by name, stages and requirements only."""

    symbols: ClassVar[frozenset[str]] = frozenset()
    reputation: ClassVar[bool] = False
    budget: float | None = None

    def __init__(self, name: str, stages: set[Stage], requires: set[str] = set()) -> None:  # noqa: B006
        self.name = name  # type: ignore[misc]
        self.stages = frozenset(stages)  # type: ignore[misc]
        self.requires = frozenset(requires)  # type: ignore[misc]

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...]:
        return ()


def test_checks_run_after_what_they_require_whatever_order_they_are_given() -> None:
    spf = Named("spf", {Stage.MAIL})
    dkim = Named("dkim", {Stage.DATA})
    arc = Named("arc", {Stage.DATA})
    dmarc = Named("dmarc", {Stage.DATA}, {"spf", "dkim", "arc"})
    other = Named("other", {Stage.DATA})
    got = in_order([dmarc, other, arc, dkim, spf])  # type: ignore[list-item]
    assert [c.name for c in got] == ["arc", "dkim", "spf", "dmarc", "other"]
    # A requirement that is not configured is no error: its facts are absent.
    assert [c.name for c in in_order([dmarc, arc])] == ["arc", "dmarc"]  # type: ignore[list-item]


def test_requirements_that_cannot_be_met_are_refused() -> None:
    a = Named("a", {Stage.DATA}, {"b"})
    b = Named("b", {Stage.DATA}, {"a"})
    with pytest.raises(ValueError, match="requires itself"):
        in_order([a, b])  # type: ignore[list-item]
    early = Named("early", {Stage.MAIL}, {"late"})
    late = Named("late", {Stage.DATA})
    with pytest.raises(ValueError, match="runs only later"):
        in_order([early, late])  # type: ignore[list-item]


def test_the_shipped_checks_put_dmarc_after_its_inputs() -> None:
    res = resolver()
    checks = [DmarcCheck(res), ArcCheck(res, threads=1), DkimCheck(res, threads=1), SpfCheck(res)]
    try:
        r = Runner(checks, Policy())
        assert r.check_names(Stage.DATA) == ["arc", "dkim", "dmarc"]
        assert DmarcCheck.requires == {"spf", "dkim", "arc"}
    finally:
        for c in checks[1:3]:
            c.close()  # type: ignore[attr-defined]


class Clocked:
    """Notes the deadline the runner hands it, and how long it had."""

    name: ClassVar[str] = "clocked"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL})
    symbols: ClassVar[frozenset[str]] = frozenset()
    reputation: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, budget: float | None) -> None:
        self.budget = budget
        self.seen: list[float] = []

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...]:
        self.seen.append(ctx.deadline - asyncio.get_running_loop().time())
        return ()


@pytest.mark.parametrize("own", [None, 30.0])
def test_the_runner_hands_each_check_its_deadline(own: float | None) -> None:
    check = Clocked(own)
    r = Runner([check], Policy(check_timeout=7))

    async def go() -> None:
        await r.run(Stage.MAIL, Context("s", "192.0.2.1", 1, "smtp"))

    asyncio.run(go())
    [left] = check.seen
    expected = own if own is not None else 7
    assert expected - 0.5 < left <= expected


def _spf_ctx() -> Context:
    c = Context("s", "192.0.2.1", 1, "smtp", helo="client.test")
    c.mail_from = parse_path("<a@silent.test>")
    return c


def test_spf_out_of_time_is_a_temperror_never_a_race_with_the_runner() -> None:
    """SPF's own time (checks.spf.timeout) equal to the policy's check_timeout: the
    runner's deadline is SPF's, and its timer waits a little past it, so the answer
    is always SPF's temperror (RFC 7208 4.6.4), never the runner's `spf.timeout`."""
    spf = SpfCheck(resolver())
    pol = Policy.model_validate({"check_timeout": 0.05, "checks": {"spf": {"timeout": 0.05}}})
    r = Runner([spf], pol)

    async def go() -> list[tuple[str, ...]]:
        out = []
        for _ in range(5):
            c = _spf_ctx()
            v = await r.run(Stage.MAIL, c)
            out.append(v.symbols)
            assert c.facts.spf is not None and c.facts.spf.result == "temperror"
            assert c.facts.incomplete == frozenset()
        return out

    assert asyncio.run(go()) == [("spf.temperror",)] * 5


def test_dnsbl_listing_whose_reason_is_late_is_a_listing_by_the_deadline() -> None:
    """The A answer says listed; the TXT reason never comes. Before the deadline the
    check answers `dnsbl.listed` without a reason: the TXT lookup is bounded by the
    runner's deadline too, not left to run past it."""
    name = "1.2.0.192.bl.test"
    listed = DnsAnswer(DnsStatus.OK, ("127.0.0.2",), 300.0)
    res = Silent({(name, "A"): listed})
    check = DnsblCheck(res)
    pol = Policy.model_validate(
        {
            "check_timeout": 5,
            "checks": {"dnsbl": {"zones": [{"name": "bl", "zone": "bl.test"}], "deadline": 0.05}},
        }
    )
    r = Runner([check], pol)

    async def go() -> tuple[tuple[str, ...], dict[str, str], float]:
        loop = asyncio.get_running_loop()
        c = Context("s", "192.0.2.1", 1, "smtp")
        t0 = loop.time()
        v = await r.run(Stage.CONNECT, c)
        return v.symbols, c.details, loop.time() - t0

    symbols, details, took = asyncio.run(go())
    assert symbols == ("dnsbl.listed",)
    assert details["dnsbl.listed"] == "bl.test"
    assert (name, "TXT") in res.asked
    assert took < 1  # by the check's own 0.05 s, not the policy's 5 s
