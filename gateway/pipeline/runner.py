"""Runs a stage's checks, owns their time budget and failures, records outcomes once."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Sequence

from gateway import metrics
from gateway.checks.base import Check, active_stages
from gateway.pipeline.policy import Policy
from gateway.pipeline.stage import Context, Stage
from gateway.pipeline.verdict import ACCEPT, Verdict
from gateway.smtp.replies import Action

log = logging.getLogger("gateway.pipeline")


class Runner:
    def __init__(self, checks: Sequence[Check], policy: Policy) -> None:
        self.checks = list(checks)
        self.policy = policy
        self._by_stage: dict[Stage, list[Check]] = {}
        self.swap_policy(policy)

    def swap_policy(self, policy: Policy) -> None:
        """Reload: new transactions see the new policy; running ones are unaffected."""
        active = [c for c in self.checks if policy.enabled(c.name)]
        for c in active:
            opts = policy.options(c.name)
            configure = getattr(c, "configure", None)
            if opts is not None and configure is not None:
                configure(opts)
        stages = {c.name: active_stages(c) for c in active}
        self._by_stage = {s: [c for c in active if s in stages[c.name]] for s in Stage}
        self.policy = policy

    def has_checks(self, stage: Stage) -> bool:
        return bool(self._by_stage[stage])

    def check_names(self, stage: Stage) -> list[str]:
        """The checks that run at `stage` under the current policy, in order."""
        return [c.name for c in self._by_stage[stage]]

    async def run(self, stage: Stage, ctx: Context) -> Verdict:
        checks = self._by_stage[stage]
        if not checks:
            return ACCEPT
        policy = self.policy
        # The strongest action so far and its symbol (the first to ask for it), and
        # every symbol seen: one Verdict at the end rather than one per symbol.
        action, symbol, strength = Action.ACCEPT, "", 0
        seen: list[str] = []
        start = time.perf_counter()
        for check in checks:
            if ctx.trusted and check.reputation:
                continue  # trusted networks: no reputation/authentication checks at all
            if ctx.allowlisted and check.name in policy.allowlist_skips:
                continue
            t0 = time.perf_counter()
            try:
                symbols = check.run(stage, ctx)
                if type(symbols) is not tuple and inspect.isawaitable(symbols):
                    # Only a check that has to wait gets a coroutine and a timer here;
                    # a tuple is an answer given at once (from a cache, say).
                    symbols = await _bounded(symbols, policy.check_timeout)
            except TimeoutError:
                log.warning("check %s timed out at %s", check.name, stage.value)
                symbols = (f"{check.name}.timeout",)
            except Exception:
                log.exception("check %s failed at %s", check.name, stage.value)
                symbols = (f"{check.name}.error",)
            metrics.child(metrics.CHECK_SECONDS, check.name).observe(time.perf_counter() - t0)
            for sym in symbols:
                metrics.child(metrics.CHECK_RESULTS, check.name, sym).inc()
                act = policy.action_for(sym)
                if act is Action.TAG or act is Action.QUARANTINE:
                    ctx.tags.append(sym)
                    if act is Action.QUARANTINE:
                        ctx.quarantine = True
                seen.append(sym)
                if act.strength > strength:
                    action, symbol, strength = act, sym, act.strength
            if action is Action.REJECT:
                break  # nothing can make a reject stronger; skip the rest
        metrics.child(metrics.STAGE_SECONDS, stage.value).observe(time.perf_counter() - start)
        return Verdict(action, symbol, tuple(seen)) if seen else ACCEPT


async def _bounded(pending: Awaitable[Sequence[str]], budget: float) -> Sequence[str]:
    """A check's answer within the policy's time budget (TimeoutError past it)."""
    async with asyncio.timeout(budget):
        return await pending
