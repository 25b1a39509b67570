"""Rate-limit and greylist state: in memory (one process, or the workers of one
machine through shared tables) or in Redis (shared by replicas)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from gateway import config
from gateway.store.greylist import GreylistStore, MemoryGreylist
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


# One greylist store per limit store: the check and the operators' HTTP routes
# (http.py) must see the same one (in memory, it is this process's dictionary).
_greylists: weakref.WeakKeyDictionary[Any, GreylistStore] = weakref.WeakKeyDictionary()


def greylist_for(store: Store) -> GreylistStore:
    """The greylist state beside `store`: in the same Redis; in the workers' shared
    greylist table when the limits are in theirs (cli.py makes both); else in this
    process's memory."""
    found = _greylists.get(store)
    if found is not None:
        return found
    made: GreylistStore
    from gateway.store.shared import SharedStore

    if isinstance(store, SharedStore):
        from gateway.store.greylist_shared import SharedGreylist, table_path

        made = SharedGreylist(table_path(store.path), store.clock)
    elif isinstance(store, MemoryStore):
        made = MemoryGreylist(store.clock)
    else:
        from gateway.store.greylist_redis import RedisGreylist

        made = RedisGreylist(store)
    _greylists[store] = made
    return made
