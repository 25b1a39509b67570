"""The greylist check (gateway/checks/greylist.py): what makes two attempts the same
triplet, who skips it, its stages, its symbols and reply, on a fake clock. Its
state's own rules: tests/unit/store/test_greylist_store.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway import config, metrics, replies
from gateway.address import Address, parse_path
from gateway.checks.greylist import GreylistCheck, GreylistOptions
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.context import Context
from gateway.dns import Resolver
from gateway.facts import DmarcOutcome, RspamdFacts, SpfFacts
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.policy import Policy
from gateway.pipeline.runner import Runner
from gateway.smtp.local import AcceptingBackend, LocalSession, plain_listener, services
from gateway.smtp.services import Services
from gateway.store.base import StoreError
from gateway.store.greylist import GreyEntry, Judgement, MemoryGreylist, Params
from gateway.store.memory import MemoryStore
from gateway.vocab import Action, Stage
from tests.unit.fakes import Clock


def addr(text: str) -> Address:
    return parse_path(f"<{text}>", allow_null=True)


def check(clock: Clock, **options: Any) -> GreylistCheck:
    opts = GreylistOptions.model_validate({"enabled": True, **options})
    return GreylistCheck(MemoryGreylist(clock)).configured(opts)


def ctx(
    ip: str = "192.0.2.10",
    sender: str = "alice@sender.test",
    rcpt: str = "bob@example.test",
    spf: str | None = None,
) -> Context:
    c = Context("s1", ip, 4000, "smtp")
    c.mail_from = addr(sender)
    c.rcpt = addr(rcpt)
    c.recipients = [addr(rcpt)]
    if spf is not None:
        c.facts.spf = SpfFacts(c.mail_from.domain, spf)
    return c


def run(chk: GreylistCheck, c: Context, stage: Stage = Stage.RCPT) -> tuple[str, ...]:
    out = chk.run(stage, c)
    if not isinstance(out, tuple):
        out = asyncio.run(_wait(out))
    return out


async def _wait(pending: Awaitable[tuple[str, ...]]) -> tuple[str, ...]:
    return await pending


def triplets(result: str) -> float:
    metrics.flush()
    return (
        REGISTRY.get_sample_value("smtp_gateway_greylist_triplets_total", {"result": result}) or 0
    )


# -- the check at RCPT --------------------------------------------------------------------


def test_first_attempt_deferred_with_a_retry_hint_then_the_retry_passes() -> None:
    clock = Clock()
    chk = check(clock)
    new, passed = triplets("new"), triplets("passed")
    c = ctx()
    assert run(chk, c) == ("greylist.deferred",)
    assert c.details["greylist.deferred"] == "300 seconds"
    reply = replies.for_action(Action.TEMPFAIL, "greylist.deferred", c.details["greylist.deferred"])
    assert str(reply) == "451 4.7.1 Greylisted, please try again in 300 seconds"
    clock.t += 200
    c = ctx()
    assert run(chk, c) == ("greylist.deferred",)
    assert c.details["greylist.deferred"] == "100 seconds"  # what is left, not the delay
    clock.t += 100
    assert run(chk, ctx()) == ("greylist.passed",)
    assert run(chk, ctx()) == ()  # whitelisted now: nothing to say
    assert (triplets("new") - new, triplets("passed") - passed) == (1, 1)


def test_a_retry_from_another_address_of_the_network_passes_another_network_does_not() -> None:
    clock = Clock()
    chk = check(clock)
    assert run(chk, ctx(ip="192.0.2.10")) == ("greylist.deferred",)
    clock.t += 300
    assert run(chk, ctx(ip="192.0.2.200")) == ("greylist.passed",)  # same /24
    assert run(chk, ctx(ip="198.51.100.10")) == ("greylist.deferred",)  # another /24


def test_a_retry_from_another_network_the_senders_spf_authorises_passes() -> None:
    """A large sender retries from another pool: SPF passed at both addresses, so the
    triplet's client is the SPF-authenticated domain and the retry is the same one."""
    clock = Clock()
    chk = check(clock)
    assert run(chk, ctx(ip="192.0.2.10", spf="pass")) == ("greylist.deferred",)
    clock.t += 300
    assert run(chk, ctx(ip="198.51.100.20", spf="pass")) == ("greylist.passed",)
    # Where SPF did not pass, the network is the client: a forger's address is new.
    assert run(chk, ctx(ip="203.0.113.5", spf="fail")) == ("greylist.deferred",)
    # And with spf_origin off, the network always.
    chk2 = check(clock, spf_origin=False)
    assert run(chk2, ctx(ip="192.0.2.10", spf="pass")) == ("greylist.deferred",)
    clock.t += 300
    assert run(chk2, ctx(ip="198.51.100.20", spf="pass")) == ("greylist.deferred",)


def test_a_networks_pending_triplets_are_capped_whatever_their_spf_origins() -> None:
    """The cap is the client network's: a client with a wildcard SPF record passes SPF
    for every subdomain of its domain, each triplet its own origin, yet its network
    holds no more than max_pending_per_network pending triplets; past it (none has
    waited the delay) a new one is deferred as any first attempt, not recorded
    (`capped`), and another network is not touched."""
    clock = Clock()
    chk = check(clock, max_pending_per_network=3)
    capped, new = triplets("capped"), triplets("new")
    for i in range(5):
        c = ctx(ip="203.0.113.7", sender=f"a@r{chr(97 + i)}.flood.test", spf="pass")
        assert run(chk, c) == ("greylist.deferred",)
        assert c.details["greylist.deferred"] == "300 seconds"
    assert (triplets("new") - new, triplets("capped") - capped) == (3, 2)
    assert run(chk, ctx(ip="192.0.2.10")) == ("greylist.deferred",)
    assert triplets("new") - new == 4
    clock.t += 300
    assert run(chk, ctx(ip="192.0.2.10")) == ("greylist.passed",)


def test_authenticated_senders_of_exempt_domains_skip_it() -> None:
    clock = Clock()
    chk = check(clock, exempt_domains=["sender.test", "*.partner.test"])
    exempt = triplets("exempt")
    assert run(chk, ctx(spf="pass")) == ()
    assert run(chk, ctx(sender="a@mx.partner.test", spf="pass")) == ()
    assert triplets("exempt") - exempt == 2
    # Listed, but not authenticated: SPF did not pass.
    assert run(chk, ctx(spf="softfail")) == ("greylist.deferred",)
    assert run(chk, ctx(spf=None)) == ("greylist.deferred",)
    # Authenticated, but not listed.
    assert run(chk, ctx(sender="a@other.test", spf="pass")) == ("greylist.deferred",)


def test_a_store_that_does_not_answer_gives_greylist_unavailable() -> None:
    class Down:
        def judge(self, network: str, triplets: Sequence[str], p: Params) -> Any:
            async def fail() -> list[Judgement]:
                raise StoreError("redis unavailable")

            return fail()

        async def entries(self, prefix: str, exact: bool) -> list[GreyEntry]:
            return []

        async def allow(self, key: str, p: Params) -> None:
            pass

        async def reset(self, prefix: str, exact: bool) -> int:
            return 0

    chk = GreylistCheck(Down()).configured(GreylistOptions(enabled=True))
    before = triplets("unavailable")
    assert run(chk, ctx()) == ("greylist.unavailable",)
    assert triplets("unavailable") - before == 1


# -- the check at DATA ----------------------------------------------------------------------


def data_ctx(rcpts: list[str], **kw: Any) -> Context:
    c = ctx(**kw)
    c.rcpt = None
    c.recipients = [addr(r) for r in rcpts]
    return c


def test_at_data_every_recipient_is_judged_and_any_new_one_defers_the_message() -> None:
    clock = Clock()
    chk = check(clock, stage="data")
    assert chk.active_stages() == {Stage.DATA}
    assert run(chk, ctx(), Stage.RCPT) == ()  # not its stage
    assert run(chk, data_ctx(["a@example.test", "b@example.test"]), Stage.DATA) == (
        "greylist.deferred",
    )
    clock.t += 300
    assert run(chk, data_ctx(["a@example.test", "b@example.test"]), Stage.DATA) == (
        "greylist.passed",
    )
    # One whitelisted recipient and one new: the message is deferred.
    both = data_ctx(["a@example.test", "c@example.test"])
    assert run(chk, both, Stage.DATA) == ("greylist.deferred",)
    assert both.details["greylist.deferred"] == "300 seconds"


def test_at_data_an_aliass_members_are_not_triplets_the_alias_is() -> None:
    clock = Clock()
    store = MemoryGreylist(clock)
    chk = GreylistCheck(store).configured(GreylistOptions(enabled=True, stage="data"))
    c = data_ctx(["m1@example.test", "m2@example.test", "d@example.test"])
    c.rewritten = [(addr("team@example.test"), (addr("m1@example.test"), addr("m2@example.test")))]
    run(chk, c, Stage.DATA)
    keys = {e.key for e in asyncio.run(store.entries("t:", exact=False))}
    assert keys == {
        "t:192.0.2.0/24|alice@sender.test|team@example.test",
        "t:192.0.2.0/24|alice@sender.test|d@example.test",
    }


def test_at_data_dmarc_aligned_senders_of_exempt_domains_skip_it() -> None:
    clock = Clock()
    chk = check(clock, stage="data", exempt_domains=["brand.test"])
    c = data_ctx(["a@example.test"], sender="bounce@esp.test")
    c.facts.dmarc = DmarcOutcome("pass", from_domain="brand.test")
    assert run(chk, c, Stage.DATA) == ()
    c = data_ctx(["a@example.test"], sender="bounce@esp.test")
    c.facts.dmarc = DmarcOutcome("fail", from_domain="brand.test")
    assert run(chk, c, Stage.DATA) == ("greylist.deferred",)


@pytest.mark.parametrize(
    ("actions", "rspamd_action", "greylisted"),
    [
        (["greylist"], "greylist", True),  # Rspamd asks the MTA to greylist
        (["greylist"], "no action", False),  # Rspamd decided: clean
        (["greylist"], "soft reject", False),  # Rspamd decided: deferred already
        (["greylist", "add header"], "add header", True),
        (None, "no action", True),  # Rspamd's verdict not consulted
        (["greylist"], None, True),  # Rspamd did not scan it (off, down, too big)
    ],
)
def test_at_data_rspamds_verdict_decides_whether_to_greylist(
    actions: list[str] | None, rspamd_action: str | None, greylisted: bool
) -> None:
    chk = check(Clock(), stage="data", rspamd_actions=actions)
    c = data_ctx(["a@example.test"])
    if rspamd_action is not None:
        c.facts.rspamd = RspamdFacts(rspamd_action, 5.0, 15.0)
    assert run(chk, c, Stage.DATA) == (("greylist.deferred",) if greylisted else ())


def test_options_errors() -> None:
    with pytest.raises(ValueError, match="expire must be longer than delay"):
        GreylistOptions(delay=600, expire=300)
    with pytest.raises(ValueError, match="network_prefix_v4"):
        GreylistOptions(network_prefix_v4=33)
    with pytest.raises(ValueError, match="stage"):
        GreylistOptions.model_validate({"stage": "mail"})
    with pytest.raises(ValueError, match="max_pending_per_network"):
        GreylistOptions(max_pending_per_network=0)  # no network could ever be recorded


# -- through the pipeline and a session ---------------------------------------------------------


def test_trusted_and_allow_listed_clients_skip_it_by_policy() -> None:
    """Trusted networks skip it as a reputation check; allow-listed clients (DNSWL,
    dnsbl.allow_networks) by `allowlist_skips`, which lists it by default."""
    chk = check(Clock())
    on = {"checks": {"greylist": {"enabled": True}}}
    runner = Runner([chk], Policy.model_validate(on))

    async def go(c: Context) -> tuple[str, ...]:
        return (await runner.run(Stage.RCPT, c)).symbols

    trusted = ctx()
    trusted.trusted = True
    listed = ctx()
    listed.allowlisted = True
    assert asyncio.run(go(trusted)) == ()
    assert asyncio.run(go(listed)) == ()
    assert asyncio.run(go(ctx())) == ("greylist.deferred",)
    narrower = Runner([chk], Policy.model_validate({**on, "allowlist_skips": ["spf"]}))
    listed2 = ctx(sender="other@sender.test")
    listed2.allowlisted = True
    assert asyncio.run(narrower.run(Stage.RCPT, listed2)).symbols == ("greylist.deferred",)


def greylisting(tmp_path: Path, greylist: str) -> config.Settings:
    """Settings for a real session in memory: SPF, DKIM, ARC and DMARC off (no DNS
    to ask), the greylist's options `greylist`."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "extends: default\nchecks:\n"
        + "".join(f"  {c}: {{enabled: false}}\n" for c in ("spf", "dkim", "arc", "dmarc"))
        + f"  greylist: {{{greylist}}}\n"
    )
    return config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
            "policy": str(policy),
            "dns": {"nameservers": ["127.0.0.1:9"]},
        }
    )


def session_services(settings: config.Settings, clock: Clock) -> tuple[Services, AcceptingBackend]:
    """The sessions' services as the app builds them, the greylist's state in memory
    on `clock`, and the backend that accepts what they relay (inside the loop)."""
    pol = policy_mod.load(settings.policy, all_known_symbols())
    runner = Runner(build_checks(settings, Resolver(settings.dns), MemoryStore(clock)), pol)
    backend = AcceptingBackend()
    return services(settings, runner, backend), backend


def test_a_session_defers_one_recipient_and_delivers_to_the_others(tmp_path: Path) -> None:
    """The real session in memory: the deferred recipient hears the retry hint at its
    RCPT, the whitelisted one is accepted, and the message goes to it alone."""
    settings = greylisting(tmp_path, "enabled: true")
    clock = Clock()

    async def go() -> tuple[list[list[str]], AcceptingBackend]:
        svc, backend = session_services(settings, clock)
        out = []
        for rcpts in (["old@example.test"], ["old@example.test", "new@example.test"]):
            s = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4000))
            try:
                await s.start()
                await s.send("EHLO client.test")
                await s.send("MAIL FROM:<a@sender.test>")
                out.append([(await s.send(f"RCPT TO:<{r}>"))[0] for r in rcpts])
                if out[-1][0].startswith("250"):
                    await s.send("DATA")
                    out[-1].append((await s.message(b"Subject: s\r\n\r\nhi\r\n"))[0])
            finally:
                await s.close()
            clock.t += 300
        return out, backend

    out, backend = asyncio.run(go())
    assert out == [
        ["451 4.7.1 Greylisted, please try again in 300 seconds"],
        [
            "250 2.0.0 Ok",
            "451 4.7.1 Greylisted, please try again in 300 seconds",
            "250 2.0.0 Ok: queued",
        ],
    ]
    [relayed] = [r for r in backend.relayed if r.message]
    assert relayed.recipients == ["old@example.test"]


def test_at_data_the_session_defers_the_whole_message_after_receiving_it(
    tmp_path: Path,
) -> None:
    settings = greylisting(tmp_path, "enabled: true, stage: data, delay: 60")
    clock = Clock()

    async def go() -> tuple[list[list[str]], AcceptingBackend]:
        svc, backend = session_services(settings, clock)
        out = []
        for _ in range(2):
            s = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4000))
            try:
                await s.start()
                await s.send("EHLO client.test")
                await s.send("MAIL FROM:<a@sender.test>")
                replies = [(await s.send(f"RCPT TO:<{r}@example.test>"))[0] for r in "ab"]
                await s.send("DATA")
                replies.append((await s.message(b"Subject: s\r\n\r\nhi\r\n"))[0])
                out.append(replies)
            finally:
                await s.close()
            clock.t += 60
        return out, backend

    out, backend = asyncio.run(go())
    assert out == [
        ["250 2.0.0 Ok", "250 2.0.0 Ok", "451 4.7.1 Greylisted, please try again in 60 seconds"],
        ["250 2.0.0 Ok", "250 2.0.0 Ok", "250 2.0.0 Ok: queued"],
    ]
    [relayed] = [r for r in backend.relayed if r.message]
    assert relayed.recipients == ["a@example.test", "b@example.test"]
