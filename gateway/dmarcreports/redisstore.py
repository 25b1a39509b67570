"""The report store in Redis, shared by replicas (store.redis_url).

Per interval, one hash of rows per group (policy domain and published policy):
field = the row as JSON, value = its count, so that a run reads one group at a
time, never the whole interval at once. Beside them, per interval: the groups
(id -> [domain, policy]), their message and row counts, the rows each
organisational domain holds (its share, `max_rows_per_domain`), the rows in all
(`max_rows`) and the evaluations lost by policy domain.

A Lua script adds a flush's batch, counting a new row only while the interval and
the domain's organisation have room (an existing one always counts): the bounds
hold however many replicas flush at once. The lease is a key set with NX and an
expiry (released only by its holder); the outbox a hash, read one message at a
time. Every key expires a week after its last write, so a store nobody reports
from stops growing.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import redis.asyncio as aioredis

from gateway import metrics
from gateway.dmarcreports.record import Key, Lost, Policy, Row, dump, org_of, policy_of, row_of
from gateway.dmarcreports.store import Group, Outgoing

KEEP = 7 * 86400  # seconds a key lives after its last write

# KEYS: intervals, groups, messages, rows counts, org shares, total, lost, then one
# rows hash per group of the batch. ARGV: max, per-domain max, keep, interval, the
# number of groups, then per group: id, [domain, policy] JSON, org, domain, number
# of rows, and (row, count) pairs; then the number of lost entries and
# (domain, count) pairs. Returns {lost as the store was full, as the org's share was}.
_ADD = """
local intervals, groups, msgs, nrows, orgs, total, lost =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local max, per, keep, interval =
  tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local held = tonumber(redis.call('GET', total) or '0')
local share = {}
local full, domain_full = 0, 0
local i = 6
for g = 1, tonumber(ARGV[5]) do
  local rows = KEYS[7 + g]
  local gid, gjson, org, domain, k = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    tonumber(ARGV[i + 4])
  i = i + 5
  local mine = share[org] or tonumber(redis.call('HGET', orgs, org) or '0')
  local added, counted, gone = 0, 0, 0
  for j = 1, k do
    local field, n = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if redis.call('HEXISTS', rows, field) == 1 then
      redis.call('HINCRBY', rows, field, n)
      counted = counted + n
    elseif held < max and mine < per then
      redis.call('HSET', rows, field, n)
      held, mine, added, counted = held + 1, mine + 1, added + 1, counted + n
    else
      if held >= max then full = full + n else domain_full = domain_full + n end
      gone = gone + n
    end
  end
  share[org] = mine
  if counted > 0 then
    redis.call('HSETNX', groups, gid, gjson)
    redis.call('HINCRBY', msgs, gid, counted)
    redis.call('EXPIRE', rows, keep)
  end
  if added > 0 then
    redis.call('HINCRBY', nrows, gid, added)
    redis.call('HINCRBY', orgs, org, added)
  end
  if gone > 0 then redis.call('HINCRBY', lost, domain, gone) end
end
local nlost = tonumber(ARGV[i])
i = i + 1
for j = 1, nlost do
  redis.call('HINCRBY', lost, ARGV[i], tonumber(ARGV[i + 1]))
  i = i + 2
end
redis.call('SET', total, held, 'EX', keep)
for _, key in ipairs({groups, msgs, nrows, orgs, lost}) do
  redis.call('EXPIRE', key, keep)
end
redis.call('ZADD', intervals, interval, interval)
redis.call('EXPIRE', intervals, keep)
return {full, domain_full}
"""

# KEYS: the group's rows, groups, messages, rows counts, org shares, total.
# ARGV: the group id, its org.
_DELETE = """
local n = redis.call('HLEN', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if n > 0 then
  if redis.call('HINCRBY', KEYS[5], ARGV[2], -n) <= 0 then redis.call('HDEL', KEYS[5], ARGV[2]) end
  if redis.call('EXISTS', KEYS[6]) == 1 then redis.call('DECRBY', KEYS[6], n) end
end
return n
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


def group_id(domain: str, policy: Policy) -> tuple[str, str]:
    """The group's id (a key name part) and its stored form."""
    text = json.dumps([domain, dump(policy)], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32], text


class RedisReportStore:
    def __init__(
        self,
        url: str,
        prefix: str,
        timeout: float,
        max_rows: int,
        max_rows_per_domain: int | None = None,
    ) -> None:
        # Typed Any as store/redis.py's: redis-py's asyncio stubs are incomplete. Ten
        # times store.timeout (a per-message bound): a run reads whole groups, and
        # a flush adds thousands of rows in one script.
        self.r: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout * 10, socket_connect_timeout=timeout * 10
        )
        self.p = f"{prefix}dmarc:"
        self.max_rows = max_rows
        self.per_domain = max_rows if max_rows_per_domain is None else max_rows_per_domain
        self._add = self.r.register_script(_ADD)
        self._delete = self.r.register_script(_DELETE)
        self._release = self.r.register_script(_RELEASE)
        self._lease = self.r.register_script(_LEASE)
        self._store_full = metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "store_full")
        self._domain_full = metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "domain_full")

    def _k(self, what: str, interval: int) -> str:
        return f"{self.p}{what}:{interval}"

    def _rows_key(self, interval: int, gid: str) -> str:
        return f"{self.p}rows:{interval}:{gid}"

    def _meta(self, interval: int) -> list[str]:
        """groups, messages, rows counts, org shares, total."""
        return [self._k(w, interval) for w in ("groups", "msgs", "nrows", "orgs", "total")]

    async def add(self, batch: dict[Key, int], lost: Lost | None = None) -> None:
        by_interval: dict[int, dict[str, tuple[str, str, str, list[Any]]]] = {}
        for key, n in batch.items():
            gid, gjson = group_id(key.domain, key.policy)
            groups = by_interval.setdefault(key.interval, {})
            g = groups.get(gid)
            if g is None:
                g = groups[gid] = (gjson, org_of(key.domain), key.domain, [])
            g[3].extend((dump(key.row), n))
        lost_by: dict[int, list[Any]] = {}
        for (interval, domain), n in (lost or {}).items():
            lost_by.setdefault(interval, []).extend((domain, n))
            by_interval.setdefault(interval, {})
        full = domain_full = 0
        for interval, groups in by_interval.items():
            keys = [f"{self.p}intervals", *self._meta(interval), self._k("lost", interval)]
            args: list[Any] = [self.max_rows, self.per_domain, KEEP, interval, len(groups)]
            for gid, (gjson, org, domain, pairs) in groups.items():
                keys.append(self._rows_key(interval, gid))
                args.extend((gid, gjson, org, domain, len(pairs) // 2, *pairs))
            extra = lost_by.get(interval, [])
            args.extend((len(extra) // 2, *extra))
            a, b = await self._add(keys=keys, args=args)
            full += int(a)
            domain_full += int(b)
        if full:
            self._store_full.inc(full)
        if domain_full:
            self._domain_full.inc(domain_full)

    async def intervals(self) -> list[int]:
        return [int(x) for x in await self.r.zrange(f"{self.p}intervals", 0, -1)]

    async def groups(self, interval: int) -> list[Group]:
        """The interval's groups, from their counts: no row is read here."""
        gkey, mkey, nkey = self._meta(interval)[:3]
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hgetall(gkey)
            pipe.hgetall(mkey)
            pipe.hgetall(nkey)
            found, msgs, nrows = await pipe.execute()
        groups = []
        for gid, text in found.items():
            domain, policy = json.loads(text)
            groups.append(
                Group(
                    interval,
                    domain,
                    policy_of(policy),
                    int(msgs.get(gid, 0)),
                    int(nrows.get(gid, 0)),
                )
            )
        if not groups and not await self.r.exists(self._k("lost", interval)):
            await self.r.zrem(f"{self.p}intervals", interval)
        return sorted(groups, key=lambda g: (-g.messages, g.domain, dump(g.policy)))

    async def rows(self, group: Group, limit: int) -> list[tuple[Row, int]]:
        """One group's rows (bounded by the domain's share), the most frequent first."""
        gid, _ = group_id(group.domain, group.policy)
        out: list[tuple[Row, int, bytes]] = []
        async for field, count in self.r.hscan_iter(
            self._rows_key(group.interval, gid), count=1000
        ):
            out.append((row_of(field), int(count), field))
        out.sort(key=lambda r: (-r[1], r[2]))
        return [(r, n) for r, n, _ in out[:limit]]

    async def dropped(self, interval: int, domain: str | None = None) -> int:
        key = self._k("lost", interval)
        if domain is not None:
            return int(await self.r.hget(key, domain) or 0)
        return sum(int(v) for v in await self.r.hvals(key))

    async def delete_group(self, group: Group) -> None:
        gid, _ = group_id(group.domain, group.policy)
        gkey, mkey, nkey, okey, tkey = self._meta(group.interval)
        keys = [self._rows_key(group.interval, gid), gkey, mkey, nkey, okey, tkey]
        await self._delete(keys=keys, args=[gid, org_of(group.domain)])

    async def clear_dropped(self, interval: int) -> None:
        await self.r.delete(self._k("lost", interval))
        if not await self.r.exists(self._k("groups", interval)):
            await self.r.delete(*self._meta(interval))
            await self.r.zrem(f"{self.p}intervals", interval)

    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        """Taken if free or expired, renewed if ours: one script, so two replicas
        can never both hold it."""
        keys = [f"{self.p}lease:{name}"]
        return bool(await self._lease(keys=keys, args=[holder, int(ttl * 1000)]))

    async def release(self, name: str, holder: str) -> None:
        await self._release(keys=[f"{self.p}lease:{name}"], args=[holder])

    @staticmethod
    def _outgoing(value: bytes | str) -> Outgoing:
        d = json.loads(value)
        return Outgoing(
            d["id"], d["rcpt"], d["domain"], base64.b64decode(d["message"]), d["attempts"]
        )

    async def outbox(self) -> list[Outgoing]:
        out = [self._outgoing(v) for v in (await self.r.hgetall(f"{self.p}outbox")).values()]
        return sorted(out, key=lambda o: (o.report_id, o.rcpt))

    async def outbox_keys(self) -> list[tuple[str, str]]:
        fields = await self.r.hkeys(f"{self.p}outbox")
        out = []
        for f in fields:
            report_id, _, rcpt = (f.decode() if isinstance(f, bytes) else f).partition(" ")
            out.append((report_id, rcpt))
        return sorted(out)

    async def outbox_get(self, report_id: str, rcpt: str) -> Outgoing | None:
        value = await self.r.hget(f"{self.p}outbox", f"{report_id} {rcpt}")
        return None if value is None else self._outgoing(value)

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
