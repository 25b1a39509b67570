"""Rate-limit state: in memory (one process) or in Redis (shared by replicas)."""

from __future__ import annotations

from gateway import config
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

Store = MemoryStore | RedisStore


def make_store(settings: config.Store) -> Store:
    if settings.redis_url:
        return RedisStore(
            settings.redis_url,
            prefix=settings.key_prefix,
            timeout=settings.timeout,
            lease_ttl=settings.lease_ttl,
        )
    return MemoryStore()
