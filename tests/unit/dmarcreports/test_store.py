"""The SQLite store: counts, its bound, the groups a run reads, the lease, the outbox."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway import metrics
from gateway.dmarcreports.record import Key, Policy
from gateway.dmarcreports.store import Outgoing, SqliteStore
from tests.unit.dmarcreports.helpers import POLICY, row
from tests.unit.fakes import Clock

DAY = 86400
T = 1_700_006_400  # a UTC midnight


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def store(tmp_path: Path, max_rows: int = 100, clock: Clock | None = None) -> SqliteStore:
    return SqliteStore(tmp_path / "new" / "dmarc.sqlite", max_rows, clock or Clock())


def test_the_file_and_its_folder_are_made_and_counts_add_up_across_flushes(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert (tmp_path / "new" / "dmarc.sqlite").is_file()
    run(s.add({Key(T, "own.test", POLICY, row()): 2}))
    run(s.add({Key(T, "own.test", POLICY, row()): 3, Key(T, "own.test", POLICY, row("::1")): 1}))
    [g] = run(s.groups(T))
    assert (g.domain, g.policy, g.messages, g.rows) == ("own.test", POLICY, 6, 2)
    assert run(s.rows(g, 10)) == [(row(), 5), (row("::1"), 1)]
    assert run(s.rows(g, 1)) == [(row(), 5)]  # the most frequent first
    assert run(s.intervals()) == [T]


def test_groups_split_by_domain_and_by_policy_most_mail_first(tmp_path: Path) -> None:
    s = store(tmp_path)
    changed = Policy("none", "none", "r", "r", 100, "0", POLICY.rua)
    run(
        s.add(
            {
                Key(T, "own.test", POLICY, row()): 1,
                Key(T, "own.test", changed, row()): 4,
                Key(T, "b.test", POLICY, row()): 2,
                Key(T + DAY, "own.test", POLICY, row()): 9,
            }
        )
    )
    assert [(g.domain, g.policy.p, g.messages) for g in run(s.groups(T))] == [
        ("own.test", "none", 4),
        ("b.test", "reject", 2),
        ("own.test", "reject", 1),
    ]
    first = run(s.groups(T))[0]
    run(s.delete_group(first))
    assert [g.messages for g in run(s.groups(T))] == [2, 1]
    assert run(s.intervals()) == [T, T + DAY]


def test_past_max_rows_new_rows_are_dropped_and_counted_known_ones_still_count(
    tmp_path: Path,
) -> None:
    s = store(tmp_path, max_rows=2)
    metrics.flush()
    before = metrics.DMARC_EVALUATIONS_DROPPED.labels("store_full")._value.get()
    run(s.add({Key(T, "own.test", POLICY, row(f"192.0.2.{i}")): 1 for i in range(5)}))
    run(s.add({Key(T, "own.test", POLICY, row("192.0.2.0")): 7}))
    [g] = run(s.groups(T))
    assert (g.rows, g.messages) == (2, 9)
    assert run(s.dropped(T)) == 3
    metrics.flush()
    assert metrics.DMARC_EVALUATIONS_DROPPED.labels("store_full")._value.get() - before == 3
    run(s.clear_dropped(T))
    assert run(s.dropped(T)) == 0


def test_the_lease_is_one_holders_until_released_or_expired(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock=clock)
    other = SqliteStore(tmp_path / "new" / "dmarc.sqlite", 100, clock)  # another process
    assert run(s.lease("run", "a", 60))
    assert not run(other.lease("run", "b", 60))
    assert run(s.lease("run", "a", 60))  # its holder may renew it
    run(other.release("run", "b"))  # only the holder releases it
    assert not run(other.lease("run", "b", 60))
    clock.t += 61
    assert run(other.lease("run", "b", 60))  # a dead holder's lease expires
    run(other.release("run", "b"))
    assert run(s.lease("run", "a", 60))


def test_the_outbox_keeps_messages_until_deleted(tmp_path: Path) -> None:
    s = store(tmp_path)
    item = Outgoing("r1", "a@x.test", "own.test", b"\x00bytes\r\n", 1)
    run(s.outbox_put(item))
    run(s.outbox_put(Outgoing("r1", "b@x.test", "own.test", b"m", 0)))
    assert run(s.outbox())[0] == item
    run(s.outbox_delete("r1", "a@x.test"))
    assert [o.rcpt for o in run(s.outbox())] == ["b@x.test"]
    run(s.close())
