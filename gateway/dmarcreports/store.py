"""Where the report rows are counted between runs: the interface every store keeps,
and SQLite, the store of one machine (its workers share the file).

The store holds, per interval, each distinct row with its count (bounded by
`max_rows`: a row past it is dropped and counted, an existing row always counts);
the reports waiting for a retry (the outbox); and a lease, so that one process at a
time makes reports (the scheduler of worker 0, `smtp-gateway dmarc-report`, or one
replica among several on Redis).

SQLite calls block, so each runs in a thread (`asyncio.to_thread`), one at a time
on one connection; WAL mode lets the workers' flushes and a report run share the
file, each waiting its turn (busy_timeout) rather than failing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from gateway import metrics
from gateway.dmarcreports.record import Key, Policy, Row, dump, policy_of, row_of

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Group:
    """One report's worth of an interval: a policy domain under one published policy."""

    interval: int
    domain: str
    policy: Policy
    messages: int  # the sum of its rows' counts
    rows: int


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A report message whose hand-over to the relay failed for a temporary reason,
    kept for the next run."""

    report_id: str
    rcpt: str
    domain: str
    message: bytes
    attempts: int


class ReportStore(Protocol):
    async def add(self, batch: dict[Key, int]) -> None: ...
    async def intervals(self) -> list[int]: ...
    async def groups(self, interval: int) -> list[Group]: ...
    async def rows(self, group: Group, limit: int) -> list[tuple[Row, int]]: ...
    async def dropped(self, interval: int) -> int: ...
    async def delete_group(self, group: Group) -> None: ...
    async def clear_dropped(self, interval: int) -> None: ...
    async def lease(self, name: str, holder: str, ttl: float) -> bool: ...
    async def release(self, name: str, holder: str) -> None: ...
    async def outbox(self) -> list[Outgoing]: ...
    async def outbox_put(self, item: Outgoing) -> None: ...
    async def outbox_delete(self, report_id: str, rcpt: str) -> None: ...
    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    interval INTEGER NOT NULL, domain TEXT NOT NULL, policy TEXT NOT NULL,
    row TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (interval, domain, policy, row)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dropped (interval INTEGER PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,
    expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (id TEXT NOT NULL, rcpt TEXT NOT NULL,
    domain TEXT NOT NULL, message BLOB NOT NULL, attempts INTEGER NOT NULL,
    PRIMARY KEY (id, rcpt));
"""


class SqliteStore:
    def __init__(self, path: Path, max_rows: int, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self.clock = clock
        self._lock = threading.Lock()
        # Autocommit (isolation_level None): each method says where its transaction is.
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._store_full = metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "store_full")

    async def _run(self, fn: Callable[[], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn()

        return await asyncio.to_thread(locked)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    # -- counting ----------------------------------------------------------------
    async def add(self, batch: dict[Key, int]) -> None:
        dropped = await self._run(lambda: self._tx(lambda db: self._add(db, batch)))
        if dropped:
            self._store_full.inc(dropped)

    def _add(self, db: sqlite3.Connection, batch: dict[Key, int]) -> int:
        held: dict[int, int] = {}
        lost: dict[int, int] = {}
        for key, n in batch.items():
            pk = (key.interval, key.domain, dump(key.policy), dump(key.row))
            cur = db.execute(
                "UPDATE rows SET count = count + ? WHERE interval = ? AND domain = ?"
                " AND policy = ? AND row = ?",
                (n, *pk),
            )
            if cur.rowcount:
                continue
            have = held.get(key.interval)
            if have is None:
                have = db.execute(
                    "SELECT COUNT(*) FROM rows WHERE interval = ?", (key.interval,)
                ).fetchone()[0]
            if have >= self.max_rows:
                lost[key.interval] = lost.get(key.interval, 0) + n
                held[key.interval] = have
                continue
            db.execute("INSERT INTO rows VALUES (?, ?, ?, ?, ?)", (*pk, n))
            held[key.interval] = have + 1
        for interval, n in lost.items():
            db.execute(
                "INSERT INTO dropped VALUES (?, ?) ON CONFLICT (interval)"
                " DO UPDATE SET count = count + excluded.count",
                (interval, n),
            )
        return sum(lost.values())

    # -- reading -----------------------------------------------------------------
    async def intervals(self) -> list[int]:
        def q() -> list[int]:
            cur = self._db.execute(
                "SELECT interval FROM rows UNION SELECT interval FROM dropped ORDER BY 1"
            )
            return [int(r[0]) for r in cur]

        return await self._run(q)

    async def groups(self, interval: int) -> list[Group]:
        def q() -> list[Group]:
            cur = self._db.execute(
                "SELECT domain, policy, SUM(count), COUNT(*) FROM rows WHERE interval = ?"
                " GROUP BY domain, policy ORDER BY 3 DESC, 1",
                (interval,),
            )
            return [Group(interval, d, policy_of(p), int(m), int(r)) for d, p, m, r in cur]

        return await self._run(q)

    async def rows(self, group: Group, limit: int) -> list[tuple[Row, int]]:
        def q() -> list[tuple[Row, int]]:
            cur = self._db.execute(
                "SELECT row, count FROM rows WHERE interval = ? AND domain = ? AND policy = ?"
                " ORDER BY count DESC, row LIMIT ?",
                (group.interval, group.domain, dump(group.policy), limit),
            )
            return [(row_of(r), int(c)) for r, c in cur]

        return await self._run(q)

    async def dropped(self, interval: int) -> int:
        def q() -> int:
            r = self._db.execute(
                "SELECT count FROM dropped WHERE interval = ?", (interval,)
            ).fetchone()
            return int(r[0]) if r else 0

        return await self._run(q)

    async def delete_group(self, group: Group) -> None:
        await self._run(
            lambda: self._db.execute(
                "DELETE FROM rows WHERE interval = ? AND domain = ? AND policy = ?",
                (group.interval, group.domain, dump(group.policy)),
            )
        )

    async def clear_dropped(self, interval: int) -> None:
        """Once the interval's reports are made (its rows go group by group: rows a
        late flush adds meanwhile stay for the next run)."""
        await self._run(
            lambda: self._db.execute("DELETE FROM dropped WHERE interval = ?", (interval,))
        )

    # -- the lease ---------------------------------------------------------------
    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            now = self.clock()
            r = db.execute("SELECT holder, expires FROM leases WHERE name = ?", (name,)).fetchone()
            if r is not None and r[0] != holder and r[1] > now:
                return False
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (name, holder, now + ttl))
            return True

        return await self._run(lambda: self._tx(q))

    async def release(self, name: str, holder: str) -> None:
        await self._run(
            lambda: self._db.execute(
                "DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)
            )
        )

    # -- the outbox --------------------------------------------------------------
    async def outbox(self) -> list[Outgoing]:
        def q() -> list[Outgoing]:
            cur = self._db.execute(
                "SELECT id, rcpt, domain, message, attempts FROM outbox ORDER BY id, rcpt"
            )
            return [Outgoing(i, r, d, bytes(m), int(a)) for i, r, d, m, a in cur]

        return await self._run(q)

    async def outbox_put(self, item: Outgoing) -> None:
        await self._run(
            lambda: self._db.execute(
                "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?)",
                (item.report_id, item.rcpt, item.domain, item.message, item.attempts),
            )
        )

    async def outbox_delete(self, report_id: str, rcpt: str) -> None:
        await self._run(
            lambda: self._db.execute(
                "DELETE FROM outbox WHERE id = ? AND rcpt = ?", (report_id, rcpt)
            )
        )

    async def close(self) -> None:
        await self._run(self._db.close)
