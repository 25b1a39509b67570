"""Limit state in Redis, shared by every replica: one Lua script per decision.

Each decision is one EVALSHA, so the check-and-update is atomic across any
number of gateway processes, and all clocks are Redis's own (`TIME`), so
replicas whose clocks drift still agree. GCRA arrival times are kept in
integer microseconds with a PX expiry at the moment the key drains.

Concurrency slots are leases: a sorted set per key whose members are our
lease ids scored by expiry. A live process renews its leases every third of
`lease_ttl`; a process that dies stops renewing, and its slots are reclaimed
by the next acquire after they expire. A slot can therefore outlive a crash by
at most `lease_ttl`, never forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.store.base import CONC, RATE, Entry, GcraOp, StoreError

log = logging.getLogger("gateway.store")

_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local news = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local capacity = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new = tat + cost * interval
  if new - now > capacity + 1 then return i end
  news[i] = new
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.0f', news[i]),
             'PX', math.ceil((news[i] - now) / 1000) + 1)
end
return 0
"""

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""

# TIME in microseconds and the stored TAT, read together for `show`.
_READ_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = tostring((tonumber(redis.call('GET', key) or now) - now) / 1000000)
end
return out
"""

_READ_CONC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('ZCOUNT', key, now + 1, '+inf')
end
return out
"""

# After a failure, decisions skip Redis for this long instead of each waiting for
# a connect timeout; they count as errors and the policy decides.
_RETRY_AFTER = 1.0


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class RedisStore:
    def __init__(self, url: str, *, prefix: str, timeout: float, lease_ttl: float) -> None:
        self.prefix = prefix
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self.client: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            decode_responses=True,
        )
        self._gcra = self.client.register_script(_GCRA)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._renew = self.client.register_script(_RENEW)
        self._read_rate = self.client.register_script(_READ_RATE)
        self._read_conc = self.client.register_script(_READ_CONC)
        # Lease ids unique across replicas and restarts of this one.
        self._ids = itertools.count()
        self._me = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._leases: dict[str, list[str]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._down_until = 0.0
        for op in ("take", "acquire", "release", "renew"):
            metrics.child(metrics.RATELIMIT_STORE_ERRORS, op)  # exported as 0 from the start

    async def _call(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        if time.monotonic() < self._down_until:
            metrics.child(metrics.RATELIMIT_STORE_ERRORS, op).inc()
            raise StoreError("redis unavailable (recent failure)")
        try:
            return await script(keys=keys, args=args)
        except (TimeoutError, RedisError, OSError) as e:
            self._down_until = time.monotonic() + _RETRY_AFTER
            metrics.child(metrics.RATELIMIT_STORE_ERRORS, op).inc()
            log.warning("rate-limit store error during %s: %s", op, e)
            raise StoreError(str(e)) from e

    async def take(self, ops: Sequence[GcraOp]) -> int:
        keys = [f"{self.prefix}{op.key}" for op in ops]
        args: list[Any] = []
        for op in ops:
            interval = op.period * 1_000_000 / op.amount
            args += [repr(interval), repr(interval * (op.amount + op.burst)), op.cost]
        refused = int(await self._call("take", self._gcra, keys, args))
        return refused - 1  # Lua's 1-based index; 0 (all allowed) becomes -1

    async def acquire(self, key: str, limit: int) -> bool:
        lease = f"{self._me}:{next(self._ids)}"
        full = f"{self.prefix}{key}"
        ok = int(await self._call("acquire", self._acquire, [full], [limit, self.lease_ms, lease]))
        if not ok:
            return False
        self._leases.setdefault(full, []).append(lease)
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        return True

    def release(self, key: str) -> None:
        """Called from a session's close path (synchronous): the ZREM runs as a task."""
        full = f"{self.prefix}{key}"
        held = self._leases.get(full)
        if not held:
            return
        lease = held.pop()
        if not held:
            del self._leases[full]
        task = asyncio.get_running_loop().create_task(self._release(full, lease))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, full: str, lease: str) -> None:
        try:
            await self.client.zrem(full, lease)
        except (TimeoutError, RedisError, OSError) as e:
            # The lease expires on its own; nothing else to do.
            metrics.child(metrics.RATELIMIT_STORE_ERRORS, "release").inc()
            log.warning("rate-limit store error during release: %s", e)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            keys, members = [], []
            for full, leases in self._leases.items():
                for lease in leases:
                    keys.append(full)
                    members.append(lease)
            if not keys:
                continue
            # A failure is counted and logged in _call; the next round tries again.
            with contextlib.suppress(StoreError):
                await self._call("renew", self._renew, keys, [self.lease_ms, *members])

    # -- operators ------------------------------------------------------------------
    async def _keys(self, kind: str, prefix: str, exact: bool) -> list[str]:
        head = f"{self.prefix}{kind}:{prefix}"
        if exact:
            return [head] if await self.client.exists(head) else []
        return sorted([k async for k in self.client.scan_iter(match=_glob_escape(head) + "*")])

    async def entries(self, prefix: str, exact: bool) -> list[Entry]:
        out: list[Entry] = []
        cut = len(self.prefix)
        for kind, script in ((RATE, self._read_rate), (CONC, self._read_conc)):
            keys = await self._keys(kind, prefix, exact)
            if not keys:
                continue
            values = await script(keys=keys, args=[])
            for k, v in zip(keys, values, strict=True):
                val = float(v)
                if val > 0:
                    out.append(Entry(kind, k[cut + len(kind) + 1 :], val))
        return sorted(out)

    async def reset(self, prefix: str, exact: bool) -> int:
        keys = await self._keys(RATE, prefix, exact) + await self._keys(CONC, prefix, exact)
        return int(await self.client.delete(*keys)) if keys else 0

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        await self.client.aclose()
