"""Where the report rows are counted between runs: the interface every store keeps,
and SQLite, the store of one machine (its workers share the file).

The store holds, per interval, each distinct row with its count, bounded by
`max_rows` in all and by `max_rows_per_domain` for the policy domains of one
organisational domain (record.org_of): a new row past either is dropped and counted
for its policy domain, whose report says so; an existing row always counts. One
sender's unique rows fill its own share: other domains still find room until the
whole store is full. It also holds the reports waiting for a retry (the outbox) and
a lease, so that one process at a time makes reports (the scheduler of worker 0,
`smtp-gateway dmarc-report`, or one replica among several on Redis).

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
from gateway.dmarcreports.record import Key, Lost, Policy, Row, dump, org_of, policy_of, row_of

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
    # `lost`: evaluations the buffer could not keep, by (interval, policy domain).
    async def add(self, batch: dict[Key, int], lost: Lost | None = None) -> None: ...
    async def intervals(self) -> list[int]: ...
    # Most mail first; a run ranks domains by the sum of their groups.
    async def groups(self, interval: int) -> list[Group]: ...
    async def rows(self, group: Group, limit: int) -> list[tuple[Row, int]]: ...
    # Evaluations not recorded, of one policy domain (None: of all).
    async def dropped(self, interval: int, domain: str | None = None) -> int: ...
    async def delete_group(self, group: Group) -> None: ...
    async def clear_dropped(self, interval: int) -> None: ...
    async def lease(self, name: str, holder: str, ttl: float) -> bool: ...
    async def release(self, name: str, holder: str) -> None: ...
    async def outbox(self) -> list[Outgoing]: ...
    # The outbox one message at a time: a run never holds all of them at once.
    async def outbox_keys(self) -> list[tuple[str, str]]: ...
    async def outbox_get(self, report_id: str, rcpt: str) -> Outgoing | None: ...
    async def outbox_put(self, item: Outgoing) -> None: ...
    async def outbox_delete(self, report_id: str, rcpt: str) -> None: ...
    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    interval INTEGER NOT NULL, domain TEXT NOT NULL, policy TEXT NOT NULL,
    row TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (interval, domain, policy, row)) WITHOUT ROWID;
DROP TABLE IF EXISTS dropped;
CREATE TABLE IF NOT EXISTS lost (interval INTEGER NOT NULL, domain TEXT NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (interval, domain)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held (interval INTEGER NOT NULL, org TEXT NOT NULL,
    rows INTEGER NOT NULL, PRIMARY KEY (interval, org)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,
    expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (id TEXT NOT NULL, rcpt TEXT NOT NULL,
    domain TEXT NOT NULL, message BLOB NOT NULL, attempts INTEGER NOT NULL,
    PRIMARY KEY (id, rcpt));
"""


class SqliteStore:
    def __init__(
        self,
        path: Path,
        max_rows: int,
        clock: Callable[[], float] = time.time,
        max_rows_per_domain: int | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self.per_domain = max_rows if max_rows_per_domain is None else max_rows_per_domain
        self.clock = clock
        self._lock = threading.Lock()
        # Autocommit (isolation_level None): each method says where its transaction is.
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._store_full = metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "store_full")
        self._domain_full = metrics.child(metrics.DMARC_EVALUATIONS_DROPPED, "domain_full")

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
    async def add(self, batch: dict[Key, int], lost: Lost | None = None) -> None:
        full, domain_full = await self._run(lambda: self._tx(lambda db: self._add(db, batch, lost)))
        if full:
            self._store_full.inc(full)
        if domain_full:
            self._domain_full.inc(domain_full)

    def _add(
        self, db: sqlite3.Connection, batch: dict[Key, int], lost: Lost | None
    ) -> tuple[int, int]:
        """One flush: (dropped as the store is full, dropped as the domain's share is)."""
        held: dict[int, int] = {}  # rows of an interval
        by_org: dict[tuple[int, str], int] = {}  # rows of an organisational domain
        new_by_org: dict[tuple[int, str], int] = {}
        out: Lost = dict(lost or {})
        full = domain_full = 0
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
                held[key.interval] = have
            ok = (key.interval, org_of(key.domain))
            mine = by_org.get(ok)
            if mine is None:
                r = db.execute(
                    "SELECT rows FROM held WHERE interval = ? AND org = ?", ok
                ).fetchone()
                mine = by_org[ok] = int(r[0]) if r else 0
            if have >= self.max_rows or mine >= self.per_domain:
                if have >= self.max_rows:
                    full += n
                else:
                    domain_full += n
                out[(key.interval, key.domain)] = out.get((key.interval, key.domain), 0) + n
                continue
            db.execute("INSERT INTO rows VALUES (?, ?, ?, ?, ?)", (*pk, n))
            held[key.interval] = have + 1
            by_org[ok] = mine + 1
            new_by_org[ok] = new_by_org.get(ok, 0) + 1
        for (interval, org), n in new_by_org.items():
            db.execute(
                "INSERT INTO held VALUES (?, ?, ?) ON CONFLICT (interval, org)"
                " DO UPDATE SET rows = rows + excluded.rows",
                (interval, org, n),
            )
        for (interval, domain), n in out.items():
            db.execute(
                "INSERT INTO lost VALUES (?, ?, ?) ON CONFLICT (interval, domain)"
                " DO UPDATE SET count = count + excluded.count",
                (interval, domain, n),
            )
        return full, domain_full

    # -- reading -----------------------------------------------------------------
    async def intervals(self) -> list[int]:
        def q() -> list[int]:
            cur = self._db.execute(
                "SELECT interval FROM rows UNION SELECT interval FROM lost ORDER BY 1"
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

    async def dropped(self, interval: int, domain: str | None = None) -> int:
        def q() -> int:
            if domain is None:
                r = self._db.execute(
                    "SELECT SUM(count) FROM lost WHERE interval = ?", (interval,)
                ).fetchone()
            else:
                r = self._db.execute(
                    "SELECT count FROM lost WHERE interval = ? AND domain = ?", (interval, domain)
                ).fetchone()
            return int(r[0]) if r and r[0] is not None else 0

        return await self._run(q)

    async def delete_group(self, group: Group) -> None:
        """The group's rows, and their room in its organisation's share."""

        def q(db: sqlite3.Connection) -> None:
            where = (group.interval, group.domain, dump(group.policy))
            cur = db.execute(
                "DELETE FROM rows WHERE interval = ? AND domain = ? AND policy = ?", where
            )
            db.execute(
                "UPDATE held SET rows = MAX(0, rows - ?) WHERE interval = ? AND org = ?",
                (cur.rowcount, group.interval, org_of(group.domain)),
            )

        await self._run(lambda: self._tx(q))

    async def clear_dropped(self, interval: int) -> None:
        """Once the interval's reports are made (its rows go group by group: rows a
        late flush adds meanwhile stay for the next run)."""

        def q(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM lost WHERE interval = ?", (interval,))
            if db.execute("SELECT 1 FROM rows WHERE interval = ? LIMIT 1", (interval,)).fetchone():
                return
            db.execute("DELETE FROM held WHERE interval = ?", (interval,))

        await self._run(lambda: self._tx(q))

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

    async def outbox_keys(self) -> list[tuple[str, str]]:
        def q() -> list[tuple[str, str]]:
            cur = self._db.execute("SELECT id, rcpt FROM outbox ORDER BY id, rcpt")
            return [(str(i), str(r)) for i, r in cur]

        return await self._run(q)

    async def outbox_get(self, report_id: str, rcpt: str) -> Outgoing | None:
        def q() -> Outgoing | None:
            r = self._db.execute(
                "SELECT id, rcpt, domain, message, attempts FROM outbox WHERE id = ? AND rcpt = ?",
                (report_id, rcpt),
            ).fetchone()
            return None if r is None else Outgoing(r[0], r[1], r[2], bytes(r[3]), int(r[4]))

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
