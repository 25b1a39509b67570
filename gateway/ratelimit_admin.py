"""`smtp-gateway ratelimit show|reset KEY`: what a limit has counted, and lifting it.

With Redis the command talks to Redis itself (any replica's view is the same
view). In memory the counts live inside the running gateway, so it asks the
gateway's own HTTP endpoint on loopback (any worker: with workers > 1 they all
count in one shared table, store/shared.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway import admin, config
from gateway.checks.ratelimit import parse_rate
from gateway.pipeline import policy as policy_mod
from gateway.store.base import CONC, Entry, operator_key


async def _via_redis(settings: config.Settings, action: str, key: str) -> dict[str, Any]:
    from gateway.store import make_store

    store = make_store(settings.store)
    prefix, exact = operator_key(key)
    try:
        if action == "reset":
            return {"deleted": await store.reset(prefix, exact)}
        return {"entries": [e._asdict() for e in await store.entries(prefix, exact)]}
    finally:
        await store.close()


async def _via_http(settings: config.Settings, action: str, key: str) -> dict[str, Any]:
    host, port = admin.loopback(settings, "the in-memory counts")
    method, path = ("POST", "/ratelimit/reset") if action == "reset" else ("GET", "/ratelimit")
    result: dict[str, Any] = await admin.request(host, port, method, path, {"key": key})
    return result


def describe(entry: Entry, pol: policy_mod.Policy) -> str:
    """One line an operator can act on: used, left, and when it is whole again."""
    name = entry.key.split(":", 1)[0]
    opts = pol.checks.ratelimit
    if entry.kind == CONC:
        conc = next((c for c in opts.concurrency if c.name == name), None)
        of = f" of {conc.max}" if conc else ""
        return f"{entry.key}: {int(entry.value)}{of} connection slot(s) held"
    lim = next((x for x in opts.limits if x.name == name), None)
    if lim is None:
        return f"{entry.key}: {entry.value:.1f}s of debt (limit not in the current policy)"
    count, period = parse_rate(lim.rate)
    used = entry.value * count / period
    cap = count + lim.burst
    left = max(0.0, cap - used)
    return (
        f"{entry.key}: {used:.1f} of {cap} {lim.unit} used ({lim.rate}, burst {lim.burst}), "
        f"{left:.1f} left, fully drained in {entry.value:.1f}s"
    )


def run(action: str, key: str, config_path: str | None) -> int:
    settings, pol = admin.load(config_path)
    opts = pol.checks.ratelimit
    names = [x.name for x in opts.limits] + [c.name for c in opts.concurrency]
    name = key.split(":", 1)[0]
    if name not in names:
        raise config.ConfigError(
            f"{key}: no limit named {name!r} in the policy {settings.policy}"
            f" (limits: {', '.join(names) or 'none'})"
        )
    via = _via_redis if settings.store.redis_url else _via_http
    result = asyncio.run(via(settings, action, key))
    if action == "reset":
        print(f"{key}: reset ({result['deleted']} key(s) removed)")
        return 0
    entries = [Entry(**e) for e in result["entries"]]
    if not entries:
        print(f"{key}: nothing counted (never seen, or fully drained)")
    for e in entries:
        print(describe(e, pol))
    return 0
