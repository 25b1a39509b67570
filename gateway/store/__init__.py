"""Rate-limit state: in memory (one process, or the workers of one machine through a
shared table) or in Redis (shared by replicas)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway import config
from gateway.store.memory import MemoryStore

if TYPE_CHECKING:
    from typing import TypeAlias

    from gateway.store.redis import RedisStore

    Store: TypeAlias = MemoryStore | RedisStore


def make_store(settings: config.Store, table: str | None = None, worker: int = 0) -> Store:
    """Redis when configured; else in memory, in the workers' shared `table` if given."""
    if settings.redis_url:
        # Imported only when configured: redis-py costs memory in every worker.
        from gateway.store.redis import RedisStore

        return RedisStore(
            settings.redis_url,
            prefix=settings.key_prefix,
            timeout=settings.timeout,
            lease_ttl=settings.lease_ttl,
        )
    if table is not None:
        from gateway.store.shared import SharedStore

        return SharedStore(table, worker)
    return MemoryStore()
