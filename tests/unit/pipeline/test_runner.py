"""The runner (gateway/pipeline/runner.py): checks run under the policy, their failures
and deadlines owned, the strongest action kept; fake checks (pure logic)."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from gateway.context import Context
from gateway.pipeline.policy import Policy
from gateway.pipeline.runner import Runner
from gateway.vocab import Action, Stage


class FakeCheck:
    name: ClassVar[str] = "fake"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL})
    symbols: ClassVar[frozenset[str]] = frozenset({"fake.bad", "fake.meh"})
    reputation: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset()
    budget: float | None = None

    def __init__(self, out: tuple[str, ...] = (), fail: bool = False, slow: bool = False):
        self.out, self.fail, self.slow = out, fail, slow

    async def run(self, stage: Stage, ctx: Context) -> tuple[str, ...]:
        if self.fail:
            raise RuntimeError("boom")
        if self.slow:
            await asyncio.sleep(10)
        return self.out


def ctx(trusted: bool = False) -> Context:
    return Context("s", "192.0.2.1", 1, "smtp", trusted=trusted)


POL = Policy(actions={"fake.bad": Action.REJECT, "fake.meh": Action.TAG}, check_timeout=0.05)


def test_strongest_action_wins_and_symbols_are_kept() -> None:
    r = Runner([FakeCheck(("fake.meh",)), FakeCheck(("fake.bad",))], POL)
    v = asyncio.run(r.run(Stage.MAIL, ctx()))
    assert v.action is Action.REJECT and v.symbol == "fake.bad"
    assert v.symbols == ("fake.meh", "fake.bad")


def test_trusted_clients_exempt_from_reputation_checks() -> None:
    r = Runner([FakeCheck(("fake.bad",))], POL)
    assert asyncio.run(r.run(Stage.MAIL, ctx(trusted=True))).action is Action.ACCEPT


def test_check_failure_and_timeout_follow_error_action() -> None:
    r = Runner([FakeCheck(fail=True)], POL)
    v = asyncio.run(r.run(Stage.MAIL, ctx()))
    assert (v.action, v.symbol) == (Action.TEMPFAIL, "fake.error")
    r = Runner([FakeCheck(slow=True)], POL)
    v = asyncio.run(r.run(Stage.MAIL, ctx()))
    assert (v.action, v.symbol) == (Action.TEMPFAIL, "fake.timeout")


class SyncFake(FakeCheck):
    """A check that answers at once (a tuple, no coroutine), as cached checks do."""

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...]:  # type: ignore[override]
        if self.fail:
            raise RuntimeError("boom")
        return self.out


def test_checks_answering_at_once_are_judged_and_fail_alike() -> None:
    r = Runner([SyncFake(("fake.meh",)), FakeCheck(("fake.bad",))], POL)
    v = asyncio.run(r.run(Stage.MAIL, ctx()))
    assert v.symbols == ("fake.meh", "fake.bad") and v.action is Action.REJECT
    v = asyncio.run(Runner([SyncFake(fail=True)], POL).run(Stage.MAIL, ctx()))
    assert (v.action, v.symbol) == (Action.TEMPFAIL, "fake.error")


def test_checks_that_crash_or_overrun_are_named_for_the_transaction() -> None:
    """What builds on a check's facts (DMARC) must know they are missing."""
    c = ctx()
    asyncio.run(Runner([SyncFake(fail=True), FakeCheck(("fake.meh",))], POL).run(Stage.MAIL, c))
    assert c.facts.incomplete == {"fake"}
    c.new_transaction()
    assert c.facts.incomplete == frozenset()
    asyncio.run(Runner([FakeCheck(slow=True)], POL).run(Stage.MAIL, c))
    assert c.facts.incomplete == {"fake"}
    c = ctx()
    asyncio.run(Runner([SyncFake(("fake.meh",))], POL).run(Stage.MAIL, c))
    assert c.facts.incomplete == frozenset()


def test_no_checks_at_stage_accepts() -> None:
    r = Runner([FakeCheck(("fake.bad",))], POL)
    assert not r.has_checks(Stage.RCPT)
    assert asyncio.run(r.run(Stage.RCPT, ctx())).action is Action.ACCEPT


def test_a_reload_changes_what_a_symbol_already_seen_decides() -> None:
    """The runner keeps each symbol's action once it has seen it; a reload must
    still take effect for the next run, and a run started before it keeps its own."""
    r = Runner([SyncFake(("fake.meh",))], POL)

    async def scenario() -> list[tuple[Action, tuple[str, ...]]]:
        out = []
        c = ctx()
        v = await r.run(Stage.MAIL, c)
        out.append((v.action, tuple(c.tags)))
        r.swap_policy(Policy(actions={"fake.meh": Action.REJECT}))
        c = ctx()
        v = await r.run(Stage.MAIL, c)
        out.append((v.action, tuple(c.tags)))
        r.swap_policy(POL)
        c = ctx()
        v = await r.run(Stage.MAIL, c)
        out.append((v.action, tuple(c.tags)))
        return out

    assert asyncio.run(scenario()) == [
        (Action.TAG, ("fake.meh",)),
        (Action.REJECT, ()),
        (Action.TAG, ("fake.meh",)),
    ]


def test_checks_with_nothing_configured_are_not_run() -> None:
    """A rate limiter without limits, a DNSBL without zones, a TLS policy without
    domains: no stage runs them. Configured, each runs only where it acts."""
    from gateway import config
    from gateway.checks.dnsbl import DnsblCheck
    from gateway.checks.ratelimit import RateLimitCheck
    from gateway.checks.tlspolicy import TlsPolicyCheck
    from gateway.dns import Resolver
    from gateway.store.memory import MemoryStore

    store = MemoryStore()
    checks = [
        DnsblCheck(Resolver(config.Dns(nameservers=["127.0.0.1:9"]))),
        TlsPolicyCheck(),
        RateLimitCheck(store),
    ]
    # The preset's per-client session limits are configured by default: at connect.
    assert Runner(checks, Policy()).check_names(Stage.CONNECT) == ["ratelimit"]
    bare = Policy.model_validate({"checks": {"ratelimit": {"concurrency": []}}})
    r = Runner(checks, bare)
    assert not any(r.has_checks(s) for s in Stage)

    configured = Policy.model_validate(
        {
            "checks": {
                "dnsbl": {"zones": [{"name": "h", "zone": "h.test", "type": "helo"}]},
                "tls": {"require_tls_to": ["secure.test"]},
                "ratelimit": {
                    "limits": [{"name": "m", "key": "client_ip", "rate": "5/minute"}],
                    "concurrency": [],
                },
            }
        }
    )
    r.swap_policy(configured)
    ran = {s: r.check_names(s) for s in Stage}
    assert ran[Stage.CONNECT] == []
    assert ran[Stage.HELO] == ["dnsbl"]
    assert ran[Stage.MAIL] == ["ratelimit"]
    assert ran[Stage.RCPT] == ["tls"]
    r.swap_policy(bare)  # and back: a reload that removes them removes the cost
    assert not any(r.has_checks(s) for s in Stage)
