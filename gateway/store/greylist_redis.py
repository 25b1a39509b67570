"""Greylist state in Redis, shared by every replica: one Lua script per decision.

The same steps as store/greylist.py's `decide`, atomic across any number of
gateway processes (a retry may land on any replica), on Redis's clock (`TIME`),
so replicas whose clocks drift still agree on when `delay` has passed. Expiry is
Redis's own (PX): a pending triplet's key lives `expire` from its first attempt,
a whitelisted one `ttl` from its last use, a network's count `awl ttl` from its
last pass or use. Values: `p:<ms>|<network>` (pending: its first attempt, and the
client network it is charged to), `w:<ms>` (whitelisted, the pass), a network's
count of passes as an integer. (`p:<ms>` without a network, as earlier versions
wrote it, is a pending entry charged to none.)

Each network's pending entries (store/greylist.py's cap) are a sorted set,
`grey:o:<network>`: the triplets' keys, scored by their first attempt. The judge
script trims the members expired by then (a pending key lives `expire` from its
first attempt, so a score older than that is gone), counts the set against the
cap, displaces the oldest member whose key still holds the pending value that put
it there (or drops a member whose key does not: removed by an operator, or by
Redis short of memory), and gives the set the expiry of its newest member: it
never outlives its entries. A pass, an operator's allow or reset removes the
entry from its network's set (the network named in the value: an SPF origin's
retry may come from another). The scripts touch those sets by names they make
(and a displaced member's key): undeclared keys, which a single Redis, as the
gateway supports, accepts; Redis Cluster would not.

It uses the rate-limit store's connection and key prefix (one Redis for both);
a failure (timeout, connection refused) raises StoreError, and after one, calls
fail at once for a second instead of each waiting for the timeout: the policy's
`greylist.unavailable` decides (default: accept).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from gateway.store.base import StoreError
from gateway.store.greylist import (
    NETWORK,
    NETWORK_PASSES,
    PENDING,
    PREFIX,
    WHITELISTED,
    GreyEntry,
    Judgement,
    Params,
    Record,
    entry,
)
from gateway.store.redis import RedisStore, _glob_escape

# Each network's pending entries: grey:o:<network>, a sorted set (module docstring).
PENDING_SETS = PREFIX + "o:"

log = logging.getLogger("gateway.store")

# A pending value's first attempt (ms) and network (empty: charged to none).
_PENDING = """
local function pending(v)
  local ms, who = string.match(v, '^p:(%d+)|?(.*)$')
  return tonumber(ms), who
end
"""

# KEYS[1]: the network's key; KEYS[2]: its pending set; KEYS[3..]: the triplets'.
# ARGV: delay, expire, ttl, awl_after, awl_ttl (milliseconds but awl_after),
# max_pending, the network (as pending values name it), the sets' key prefix.
_JUDGE = (
    _PENDING
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay, expire, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local after, awl_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local cap, owner, sets = tonumber(ARGV[6]), ARGV[7], ARGV[8]
local mine = KEYS[2]
local out = {}
if after > 0 then
  local n = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  if n >= after then
    redis.call('PEXPIRE', KEYS[1], awl_ttl)
    for i = 3, #KEYS do out[#out + 1] = 'network'; out[#out + 1] = '0' end
    return out
  end
end
-- Room for one more pending entry of this network: at its cap, its oldest goes
-- if it has waited `delay`; else none is made.
local function room()
  redis.call('ZREMRANGEBYSCORE', mine, '-inf', now - expire)
  while redis.call('ZCARD', mine) >= cap do
    local oldest = redis.call('ZRANGE', mine, 0, 0, 'WITHSCORES')
    local key, since = oldest[1], tonumber(oldest[2])
    local v = redis.call('GET', key)
    if v == 'p:' .. string.format('%.0f', since) .. '|' .. owner then
      if now - since < delay then return false end
      redis.call('DEL', key)
    end
    redis.call('ZREM', mine, key)
  end
  return true
end
local passes = 0
for i = 3, #KEYS do
  local v = redis.call('GET', KEYS[i])
  local kind = v and string.sub(v, 1, 2) or ''
  if kind == 'w:' then
    redis.call('PEXPIRE', KEYS[i], ttl)
    out[#out + 1] = 'whitelisted'; out[#out + 1] = '0'
    passes = passes + 1
  elseif kind == 'p:' then
    local first, who = pending(v)
    local waited = now - (first or now)
    if waited < delay then
      out[#out + 1] = 'early'; out[#out + 1] = tostring(delay - waited)
    else
      redis.call('SET', KEYS[i], 'w:' .. string.format('%.0f', now), 'PX', ttl)
      if who and who ~= '' then redis.call('ZREM', sets .. who, KEYS[i]) end
      out[#out + 1] = 'passed'; out[#out + 1] = '0'
      passes = passes + 1
    end
  elseif room() then
    local stamp = string.format('%.0f', now)
    redis.call('SET', KEYS[i], 'p:' .. stamp .. '|' .. owner, 'PX', expire)
    redis.call('ZADD', mine, stamp, KEYS[i])
    redis.call('PEXPIRE', mine, expire)
    out[#out + 1] = 'new'; out[#out + 1] = tostring(delay)
  else
    out[#out + 1] = 'capped'; out[#out + 1] = tostring(delay)
  end
end
if after > 0 and passes > 0 then
  redis.call('INCRBY', KEYS[1], passes)
  redis.call('PEXPIRE', KEYS[1], awl_ttl)
end
return out
"""
)

# KEYS[1]: a triplet (ARGV[1] = 0) or a network (ARGV[1] = 1); ARGV[2]: its ttl in
# ms; ARGV[3]: a network's passes at least; ARGV[4]: the pending sets' key prefix.
_ALLOW = (
    _PENDING
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == '1' then
  local n = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  local want = tonumber(ARGV[3])
  if n < want then n = want end
  redis.call('SET', KEYS[1], tostring(n), 'PX', tonumber(ARGV[2]))
else
  local v = redis.call('GET', KEYS[1])
  if v and string.sub(v, 1, 2) == 'p:' then
    local _, who = pending(v)
    if who and who ~= '' then redis.call('ZREM', ARGV[4] .. who, KEYS[1]) end
  end
  redis.call('SET', KEYS[1], 'w:' .. string.format('%.0f', now), 'PX', tonumber(ARGV[2]))
end
return 1
"""
)

# KEYS: entries to forget; a pending one leaves its network's set (ARGV[1]: the
# sets' key prefix). How many there were.
_FORGET = (
    _PENDING
    + """
local n = 0
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v and string.sub(v, 1, 2) == 'p:' then
    local _, who = pending(v)
    if who and who ~= '' then redis.call('ZREM', ARGV[1] .. who, key) end
  end
  n = n + redis.call('DEL', key)
end
return n
"""
)

# Each key's value and milliseconds to live, and Redis's time, read together.
_READ = """
local t = redis.call('TIME')
local out = {tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
for i, key in ipairs(KEYS) do
  out[#out + 1] = redis.call('GET', key) or ''
  out[#out + 1] = tostring(redis.call('PTTL', key))
end
return out
"""

_RETRY_AFTER = 1.0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisGreylist:
    def __init__(self, store: RedisStore) -> None:
        self.prefix = store.prefix
        self.client: Any = store.client
        self._judge = self.client.register_script(_JUDGE)
        self._allow = self.client.register_script(_ALLOW)
        self._read = self.client.register_script(_READ)
        self._forget = self.client.register_script(_FORGET)
        self.sets = self.prefix + PENDING_SETS
        self._down_until = 0.0

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if time.monotonic() < self._down_until:
            raise StoreError("redis unavailable (recent failure)")
        try:
            return await script(keys=keys, args=args)
        except (TimeoutError, RedisError, OSError) as e:
            self._down_until = time.monotonic() + _RETRY_AFTER
            log.warning("greylist store error: %s", e)
            raise StoreError(str(e)) from e

    async def judge(self, network: str, triplets: Sequence[str], p: Params) -> list[Judgement]:
        net = network.removeprefix(NETWORK)
        keys = [self.prefix + network, self.sets + net, *(self.prefix + k for k in triplets)]
        args = [
            _ms(p.delay),
            _ms(p.expire),
            _ms(p.ttl),
            p.awl_after,
            _ms(p.awl_ttl),
            p.max_pending,
            net,
            self.sets,
        ]
        flat = await self._call(self._judge, keys, args)
        return [Judgement(str(flat[i]), float(flat[i + 1]) / 1000) for i in range(0, len(flat), 2)]

    # -- operators ------------------------------------------------------------------
    async def _keys(self, prefix: str, exact: bool) -> list[str]:
        head = f"{self.prefix}{PREFIX}{prefix}"
        if head.startswith(self.sets):
            return []  # the networks' pending sets are no entries
        if exact:
            return [head] if await self.client.exists(head) else []
        found = self.client.scan_iter(match=_glob_escape(head) + "*")
        return sorted([k async for k in found if not k.startswith(self.sets)])

    async def entries(self, prefix: str, exact: bool) -> list[GreyEntry]:
        keys = await self._keys(prefix, exact)
        if not keys:
            return []
        flat = await self._read(keys=keys, args=[])
        now = float(flat[0]) / 1000
        out = []
        cut = len(self.prefix)
        for i, key in enumerate(keys):
            value, pttl = str(flat[1 + 2 * i]), int(flat[2 + 2 * i])
            if not value or pttl == -2:
                continue  # gone since the scan
            expires = now + pttl / 1000 if pttl >= 0 else float("inf")
            rec = _record(key[cut:], value, expires)
            if rec is not None:
                out.append(entry(key[cut:], rec, now))
        return sorted(out)

    async def allow(self, key: str, p: Params) -> None:
        full = self.prefix + PREFIX + key
        if full.startswith(self.prefix + NETWORK):
            args = [1, _ms(p.awl_ttl), max(p.awl_after, 1), self.sets]
        else:
            args = [0, _ms(p.ttl), 0, self.sets]
        await self._allow(keys=[full], args=args)

    async def reset(self, prefix: str, exact: bool) -> int:
        keys = await self._keys(prefix, exact)
        return int(await self._forget(keys=keys, args=[self.sets])) if keys else 0


def _record(key: str, value: str, expires: float) -> Record | None:
    if key.startswith(NETWORK):
        try:
            return Record(NETWORK_PASSES, float(int(value)), expires)
        except ValueError:
            return None
    kind = {"p:": PENDING, "w:": WHITELISTED}.get(value[:2])
    if kind is None:
        return None
    first, _, owner = value[2:].partition("|")
    try:
        return Record(kind, float(first) / 1000, expires, NETWORK + owner if owner else "")
    except ValueError:
        return None
