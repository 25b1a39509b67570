"""The report store in Redis, shared by replicas (store.redis_url).

Per interval, one hash of rows: field = [domain, policy, row] as JSON, value = the
count. A Lua script adds a flush's batch, counting a new field only while the hash
holds fewer than `max_rows` (an existing one always counts): the bound holds
however many replicas flush at once. The lease is a key set with NX and an expiry
(released only by its holder); the outbox a hash. Every key expires a week after
its last write, so a store nobody reports from stops growing.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis.asyncio as aioredis

from gateway import metrics
from gateway.dmarcreports.record import Key, Policy, Row, dump, policy_of, row_of
from gateway.dmarcreports.store import Group, Outgoing

KEEP = 7 * 86400  # seconds a key lives after its last write

_ADD = """
local rows, dropped, intervals = KEYS[1], KEYS[2], KEYS[3]
local max, keep, interval = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local held = redis.call('HLEN', rows)
local lost = 0
for i = 4, #ARGV, 2 do
  local field, n = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('HEXISTS', rows, field) == 1 then
    redis.call('HINCRBY', rows, field, n)
  elseif held < max then
    redis.call('HSET', rows, field, n)
    held = held + 1
  else
    lost = lost + n
  end
end
if lost > 0 then
  redis.call('INCRBY', dropped, lost)
  redis.call('EXPIRE', dropped, keep)
end
if held > 0 then redis.call('EXPIRE', rows, keep) end
redis.call('ZADD', intervals, interval, interval)
redis.call('EXPIRE', intervals, keep)
return lost
"""

_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisReportStore:
    def __init__(self, url: str, prefix: str, timeout: float, max_rows: int) -> None:
        # Typed Any as store/redis.py's: redis-py's asyncio stubs are incomplete. Ten
        # times store.timeout (a per-message bound): a run reads whole intervals, and
        # a flush adds thousands of rows in one script.
        self.r: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout * 10, socket_connect_timeout=timeout * 10
        )
        self.p = f"{prefix}dmarc:"
        self.max_rows = max_rows
        self._add = self.r.register_script(_ADD)
        self._release = self.r.register_script(_RELEASE)
        self._lease = self.r.register_script(_LEASE)
        self._store_full = metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "store_full")
        # The rows of the interval being reported, read once per run (groups, then rows).
        self._loaded: tuple[int, dict[tuple[str, Policy], list[tuple[Row, int, bytes]]]] | None = (
            None
        )

    def _rows_key(self, interval: int) -> str:
        return f"{self.p}rows:{interval}"

    async def add(self, batch: dict[Key, int]) -> None:
        by_interval: dict[int, list[Any]] = {}
        for key, n in batch.items():
            field = json.dumps([key.domain, dump(key.policy), dump(key.row)], separators=(",", ":"))
            by_interval.setdefault(key.interval, []).extend((field, n))
        lost = 0
        for interval, args in by_interval.items():
            keys = [self._rows_key(interval), f"{self.p}dropped:{interval}", f"{self.p}intervals"]
            lost += int(await self._add(keys=keys, args=[self.max_rows, KEEP, interval, *args]))
        if lost:
            self._store_full.inc(lost)

    async def intervals(self) -> list[int]:
        return [int(x) for x in await self.r.zrange(f"{self.p}intervals", 0, -1)]

    async def _load(self, interval: int) -> dict[tuple[str, Policy], list[tuple[Row, int, bytes]]]:
        if self._loaded is not None and self._loaded[0] == interval:
            return self._loaded[1]
        out: dict[tuple[str, Policy], list[tuple[Row, int, bytes]]] = {}
        async for field, count in self.r.hscan_iter(self._rows_key(interval), count=1000):
            domain, policy, row = json.loads(field)
            out.setdefault((domain, policy_of(policy)), []).append((row_of(row), int(count), field))
        for rows in out.values():
            rows.sort(key=lambda r: (-r[1], dump(r[0])))
        self._loaded = (interval, out)
        return out

    async def groups(self, interval: int) -> list[Group]:
        self._loaded = None  # a run starts from what the store holds now
        loaded = await self._load(interval)
        groups = [
            Group(interval, d, p, sum(r[1] for r in rows), len(rows))
            for (d, p), rows in loaded.items()
        ]
        if not groups:
            await self.r.zrem(f"{self.p}intervals", interval)
        return sorted(groups, key=lambda g: (-g.messages, g.domain))

    async def rows(self, group: Group, limit: int) -> list[tuple[Row, int]]:
        loaded = await self._load(group.interval)
        return [(r, n) for r, n, _ in loaded.get((group.domain, group.policy), [])[:limit]]

    async def dropped(self, interval: int) -> int:
        return int(await self.r.get(f"{self.p}dropped:{interval}") or 0)

    async def delete_group(self, group: Group) -> None:
        loaded = await self._load(group.interval)
        rows = loaded.pop((group.domain, group.policy), [])
        if rows:
            await self.r.hdel(self._rows_key(group.interval), *[f for _, _, f in rows])

    async def clear_dropped(self, interval: int) -> None:
        await self.r.delete(f"{self.p}dropped:{interval}")
        if not await self.r.exists(self._rows_key(interval)):
            await self.r.zrem(f"{self.p}intervals", interval)
        self._loaded = None

    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        """Taken if free or expired, renewed if ours: one script, so two replicas
        can never both hold it."""
        keys = [f"{self.p}lease:{name}"]
        return bool(await self._lease(keys=keys, args=[holder, int(ttl * 1000)]))

    async def release(self, name: str, holder: str) -> None:
        await self._release(keys=[f"{self.p}lease:{name}"], args=[holder])

    async def outbox(self) -> list[Outgoing]:
        out = []
        for value in (await self.r.hgetall(f"{self.p}outbox")).values():
            d = json.loads(value)
            out.append(
                Outgoing(
                    d["id"], d["rcpt"], d["domain"], base64.b64decode(d["message"]), d["attempts"]
                )
            )
        return sorted(out, key=lambda o: (o.report_id, o.rcpt))

    async def outbox_put(self, item: Outgoing) -> None:
        value = json.dumps(
            {
                "id": item.report_id,
                "rcpt": item.rcpt,
                "domain": item.domain,
                "message": base64.b64encode(item.message).decode(),
                "attempts": item.attempts,
            }
        )
        key = f"{self.p}outbox"
        await self.r.hset(key, f"{item.report_id} {item.rcpt}", value)
        await self.r.expire(key, KEEP)

    async def outbox_delete(self, report_id: str, rcpt: str) -> None:
        await self.r.hdel(f"{self.p}outbox", f"{report_id} {rcpt}")

    async def close(self) -> None:
        await self.r.aclose()
