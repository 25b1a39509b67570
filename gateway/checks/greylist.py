"""Greylisting: the first delivery attempt of an unknown (client, sender,
recipient) triplet is deferred; a retry after `delay` passes, and the triplet is
whitelisted for `ttl`.

Spam software that sends once and never retries loses its mail; a real MTA
retries and loses a few minutes, once per triplet (and with auto-whitelisting,
once per few triplets of its network). What counts as the same triplet across
attempts (networks, SPF-authenticated origins, normalised senders) is in
checks/greylist_keys.py; the state and the decision in store/greylist.py.

The stage (`stage`), a choice for the operator:

- `rcpt` (the default, as postgrey and Postfix policy services do it): each
  recipient is judged at its RCPT with what is known then: the client (trusted
  networks and DNSWL-listed clients never get here: the runner skips this check
  for them, see below), the sender and its SPF result. A deferred recipient gets
  `451 4.7.1` at once, before any message data is sent, and the others of the
  transaction go on. DKIM, DMARC and Rspamd have not run yet at RCPT: the
  exemptions that need them do not apply.
- `data`: the whole message is judged at the end of DATA, after the content
  checks: every recipient's triplet at once, and the message deferred if any is
  not yet whitelisted (the retry then passes them all). The client sends the
  message before it hears `451`, but DMARC-aligned senders can be exempted, and
  with Rspamd configured, only what Rspamd asks to greylist is greylisted
  (`rspamd_actions`): Rspamd's own greylist action means "the MTA should
  greylist this", and every other verdict is Rspamd's decision already.

Who skips it, all in the policy:

- trusted networks (`trusted_networks`): a reputation check, skipped like DNSBL;
- allow-listed clients (a DNSWL zone of `checks.dnsbl`, or its `allow_networks`):
  `greylist` in `allowlist_skips` (the default preset lists it);
- senders of `exempt_domains` whose domain is authenticated: SPF pass for the
  MAIL FROM domain (both stages), or DMARC pass, that is SPF or DKIM aligned
  with the From domain (stage `data`);
- at stage `data`, a message Rspamd gave a verdict outside `rspamd_actions`.

Authenticated (SMTP AUTH) senders do not reach this check: the gateway is an
inbound MX and offers no AUTH; submission is another service's.

A client network holds at most `max_pending_per_network` pending triplets (the
store's rule, store/greylist.py): a flood of new triplets from one network
displaces its own, never another network's nor a whitelisted one.

Symbols: `greylist.deferred` (tempfail: `451 4.7.1 Greylisted, please try again
in N seconds`; a new triplet the cap kept from being recorded too),
`greylist.passed` (a retry that passed: recorded), `greylist.unavailable` (the
Redis store did not answer: accept, fail open, by default; tempfail fails
closed).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Awaitable
from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field

from gateway import metrics
from gateway.address import Address
from gateway.checks.greylist_keys import (
    network_key,
    origin,
    recipient_key,
    sender_key,
    triplet_key,
)
from gateway.checks.relay import DomainMatcher
from gateway.config import Strict
from gateway.context import Context
from gateway.store.base import StoreError
from gateway.store.greylist import (
    BY_NETWORK,
    CAPPED,
    DEFERRED,
    EARLY,
    KNOWN,
    MAX_PENDING,
    NEW,
    PASSED,
    GreylistStore,
    Judgement,
    MemoryGreylist,
    Params,
)
from gateway.vocab import Stage

DEFERRED_SYMBOL = "greylist.deferred"
PASSED_SYMBOL = "greylist.passed"
UNAVAILABLE_SYMBOL = "greylist.unavailable"

DAY = 86400.0
# The values of smtp_gateway_greylist_triplets_total's `result` label.
RESULTS = (NEW, EARLY, CAPPED, PASSED, KNOWN, BY_NETWORK, "exempt", "unavailable")


class AutoWhitelist(Strict):
    """A client network whose triplets passed `after` times (retries that came back
    in time, and whitelisted triplets used again) skips greylisting for `ttl`
    seconds, renewed by each message from it: a network that proved it retries
    is not made to prove it for every new sender and recipient."""

    # Passes of the network's triplets that whitelist it; 0 turns this off.
    after: Annotated[int, Field(ge=0)] = 5
    # Seconds it stays whitelisted after its last message (7 days).
    ttl: Annotated[float, Field(gt=0)] = 7 * DAY


class GreylistOptions(Strict):
    enabled: bool = False
    # rcpt: each recipient at its RCPT (postgrey's way); data: the whole message at
    # the end of DATA, after DKIM, DMARC and Rspamd (see checks/greylist.py).
    stage: Literal["rcpt", "data"] = "rcpt"
    # Seconds a triplet's retry must wait after its first attempt (5 minutes).
    delay: Annotated[float, Field(ge=0)] = 300.0
    # Seconds after its first attempt within which a retry must come (2 days); later,
    # the attempt counts as a first one again.
    expire: Annotated[float, Field(gt=0)] = 2 * DAY
    # Seconds a triplet stays whitelisted after its last use (36 days).
    ttl: Annotated[float, Field(gt=0)] = 36 * DAY
    # The client network of a triplet: senders retry from pools of addresses.
    network_prefix_v4: Annotated[int, Field(ge=8, le=32)] = 24
    network_prefix_v6: Annotated[int, Field(ge=16, le=128)] = 64  # the same for IPv6
    # When SPF passed, the triplet's client is the SPF-authenticated domain instead
    # of the network: a retry from any address its SPF record names passes.
    spf_origin: bool = True
    # Pending (not yet retried) triplets one client network (network_prefix_v4/_v6)
    # may hold. Past it, a new triplet displaces the network's oldest one if that
    # has waited `delay`, else it is deferred without being recorded (`capped`):
    # a flood of new triplets displaces only its own network's (store/greylist.py).
    max_pending_per_network: Annotated[int, Field(ge=1)] = MAX_PENDING
    auto_whitelist: AutoWhitelist = AutoWhitelist()
    # Sender domains (*.example.org for subdomains) that skip greylisting when
    # authenticated: SPF pass for the MAIL FROM domain, or (stage data) DMARC pass
    # for the From domain.
    exempt_domains: list[str] = Field(default_factory=list)
    # Stage data, Rspamd enabled: greylist a message only when Rspamd's action is
    # one of these; any other verdict is Rspamd's decision. null: ignore Rspamd.
    rspamd_actions: list[str] | None = Field(default_factory=lambda: ["greylist"])

    def model_post_init(self, _ctx: object) -> None:
        if self.expire <= self.delay:
            raise ValueError("expire must be longer than delay (or no retry could pass)")


class GreylistCheck:
    name: ClassVar[str] = "greylist"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.RCPT, Stage.DATA})
    symbols: ClassVar[frozenset[str]] = frozenset(
        {DEFERRED_SYMBOL, PASSED_SYMBOL, UNAVAILABLE_SYMBOL}
    )
    # Trusted networks skip it, as they skip DNSBL and SPF.
    reputation: ClassVar[bool] = True
    # SPF's facts (at MAIL) for the origin and the exemptions; at stage data,
    # DMARC's and Rspamd's.
    requires: ClassVar[frozenset[str]] = frozenset({"spf", "dmarc", "rspamd"})
    budget: float | None = None

    def __init__(self, store: GreylistStore | None = None) -> None:
        self.store: GreylistStore = store if store is not None else MemoryGreylist()
        self.options = GreylistOptions()
        self.stage = Stage.RCPT
        self.params = params_of(self.options)
        self.domains = DomainMatcher([])
        self.rspamd_actions: frozenset[str] | None = frozenset({"greylist"})

    def configured(self, options: GreylistOptions) -> Self:
        """This check under `options`: a new object judging in the same store."""
        new = copy.copy(self)
        new.options = options
        new.stage = Stage.RCPT if options.stage == "rcpt" else Stage.DATA
        new.params = params_of(options)
        new.domains = DomainMatcher([d.lower() for d in options.exempt_domains])
        actions = options.rspamd_actions
        new.rspamd_actions = None if actions is None else frozenset(a.lower() for a in actions)
        for result in RESULTS:  # exported at zero: the first deferral shows in increase()
            metrics.child(metrics.GREYLIST_TRIPLETS, result)
        return new

    def active_stages(self) -> set[Stage]:
        return {self.stage}

    def _exempt(self, stage: Stage, ctx: Context) -> bool:
        facts = ctx.facts
        spf = facts.spf
        if self.domains:
            if spf is not None and spf.result == "pass" and spf.domain.lower() in self.domains:
                return True
            dmarc = facts.dmarc
            if (
                dmarc is not None
                and dmarc.result == "pass"
                and dmarc.from_domain.lower() in self.domains
            ):
                return True
        rspamd = facts.rspamd
        return (
            stage is Stage.DATA
            and self.rspamd_actions is not None
            and rspamd is not None
            and rspamd.action.lower() not in self.rspamd_actions
        )

    def _recipients(self, stage: Stage, ctx: Context) -> list[Address]:
        """RCPT: the recipient judged now. DATA: every recipient as the client gave
        it (an alias's members are not triplets of the client's)."""
        if stage is Stage.RCPT:
            return [ctx.rcpt] if ctx.rcpt is not None else []
        members = {t for _, targets in ctx.rewritten for t in targets}
        given = [orig for orig, _ in ctx.rewritten]
        return given + [r for r in ctx.recipients if r not in members]

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        if stage is not self.stage or ctx.mail_from is None:
            return ()
        rcpts = self._recipients(stage, ctx)
        if not rcpts:
            return ()
        if self._exempt(stage, ctx):
            _count("exempt", len(rcpts))
            return ()
        o = self.options
        v4, v6 = o.network_prefix_v4, o.network_prefix_v6
        where = origin(ctx.client_ip, ctx.facts.spf, v4, v6, o.spf_origin)
        sender = sender_key(ctx.mail_from)
        keys = list(dict.fromkeys(triplet_key(where, sender, recipient_key(r)) for r in rcpts))
        net = network_key(ctx.client_ip, v4, v6)
        try:
            judged = self.store.judge(net, keys, self.params)
        except StoreError:
            return _unavailable(len(keys))
        if isinstance(judged, list):
            return _verdict(ctx, judged)
        return _finish(ctx, judged, len(keys))


def params_of(o: GreylistOptions) -> Params:
    """The store's view of the options (the operators' commands use it too)."""
    awl = o.auto_whitelist
    return Params(o.delay, o.expire, o.ttl, awl.after, awl.ttl, o.max_pending_per_network)


def _count(result: str, n: int = 1) -> None:
    metrics.child(metrics.GREYLIST_TRIPLETS, result).inc(n)


def _unavailable(n: int) -> tuple[str, ...]:
    _count("unavailable", n)
    return (UNAVAILABLE_SYMBOL,)


async def _finish(ctx: Context, pending: Awaitable[list[Judgement]], n: int) -> tuple[str, ...]:
    try:
        judged = await pending
    except StoreError:
        return _unavailable(n)
    return _verdict(ctx, judged)


def _verdict(ctx: Context, judged: list[Judgement]) -> tuple[str, ...]:
    """Deferred if any triplet is (the retry hint: the longest wait among them);
    else `greylist.passed` if one passed its retry now; else nothing."""
    wait = -1.0
    passed = False
    for j in judged:
        _count(j.result)
        if j.result in DEFERRED:
            wait = max(wait, j.wait)
        elif j.result == PASSED:
            passed = True
    if wait >= 0:
        seconds = max(1, math.ceil(wait))
        ctx.details[DEFERRED_SYMBOL] = f"{seconds} second{'s' if seconds != 1 else ''}"
        return (DEFERRED_SYMBOL,)
    return (PASSED_SYMBOL,) if passed else ()
