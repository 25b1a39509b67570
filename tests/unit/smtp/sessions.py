"""The gateway's session in memory (gateway/smtp/local.py), for the tests of its parts:
the listeners' own Session, driven command by command without a socket, a process
or a backend server.

The policy turns off the checks that need DNS; relay control, the rate limiter
and the TLS policy run as they do live.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway import config
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.dns import Resolver
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.runner import Runner
from gateway.smtp.local import AcceptingBackend, LocalSession, plain_listener, services
from gateway.store.memory import MemoryStore

T = TypeVar("T")


POLICY = """
checks:
  spf: {enabled: false}
  dkim: {enabled: false}
  dmarc: {enabled: false}
  arc: {enabled: false}
  dnsbl: {enabled: false}
"""


def session_run(
    settings: config.Settings,
    play: Callable[[LocalSession, AcceptingBackend], Awaitable[T]],
    store: MemoryStore | None = None,
) -> T:
    """`play` against one session; `store`: the rate-limit store (a fresh one if None)."""

    async def go() -> T:
        pol = policy_mod.load(settings.policy, all_known_symbols())
        limits = MemoryStore() if store is None else store
        runner = Runner(build_checks(settings, Resolver(settings.dns), limits), pol)
        backend = AcceptingBackend()
        svc = services(settings, runner, backend)
        s = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4000))
        try:
            return await play(s, backend)
        finally:
            await s.close()

    return asyncio.run(go())


# What a client refused by a rate limit reads (replies.py, ratelimit.exceeded: tempfail).
RATE_LIMITED = ["450 4.7.1 Rate limit exceeded, try again later"]
