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


def _dropped(reason: str) -> float:
    metrics.flush()
    return float(metrics.DMARC_EVALUATIONS_DROPPED.labels(reason)._value.get())


ATTACKER = Policy("none", "none", "r", "r", 100, "0", "mailto:r@attacker.test")


def test_one_domains_unique_rows_fill_its_share_and_every_other_domain_still_counts(
    tmp_path: Path,
) -> None:
    """The reviewer's crowd-out: 200 unique rows of one sender used to fill max_rows
    and every other domain's mail was then dropped. Its share is full first: what
    is lost is its own, counted for it."""
    s = SqliteStore(tmp_path / "dmarc.sqlite", 200, Clock(), max_rows_per_domain=50)
    before = (_dropped("domain_full"), _dropped("store_full"))
    run(s.add({Key(T, "attacker.test", ATTACKER, row(f"2001:db8::{i:x}")): 1 for i in range(200)}))
    run(s.add({Key(T, "own.test", POLICY, row()): 1000}))
    assert [(g.domain, g.messages, g.rows) for g in run(s.groups(T))] == [
        ("own.test", 1000, 1),
        ("attacker.test", 50, 50),
    ]
    assert run(s.dropped(T, "attacker.test")) == 150
    assert run(s.dropped(T, "own.test")) == 0
    assert run(s.dropped(T)) == 150
    assert (_dropped("domain_full") - before[0], _dropped("store_full") - before[1]) == (150, 0)


def test_subdomains_share_their_organisations_share_and_a_deleted_group_frees_it(
    tmp_path: Path,
) -> None:
    """A wildcard record makes any number of policy domains under one registered
    domain: they take one share between them."""
    s = SqliteStore(tmp_path / "dmarc.sqlite", 1000, Clock(), max_rows_per_domain=4)
    run(s.add({Key(T, f"s{i}.attacker.test", ATTACKER, row(f"192.0.2.{i}")): 1 for i in range(10)}))
    groups = run(s.groups(T))
    assert len(groups) == 4
    assert run(s.dropped(T)) == 6
    run(s.delete_group(groups[0]))
    run(s.add({Key(T, "s9.attacker.test", ATTACKER, row("192.0.2.9")): 1}))  # room again
    assert "s9.attacker.test" in {g.domain for g in run(s.groups(T))}


def test_what_the_buffer_lost_is_kept_by_domain_until_the_interval_is_cleared(
    tmp_path: Path,
) -> None:
    s = store(tmp_path)
    run(s.add({}, {(T, "own.test"): 3, (T, "b.test"): 1}))
    run(s.add({Key(T, "own.test", POLICY, row()): 1}, {(T, "own.test"): 2}))
    assert run(s.intervals()) == [T]
    assert (run(s.dropped(T, "own.test")), run(s.dropped(T, "b.test"))) == (5, 1)
    [g] = run(s.groups(T))
    run(s.delete_group(g))
    run(s.clear_dropped(T))
    assert run(s.intervals()) == [] and run(s.dropped(T)) == 0


def test_the_outbox_is_read_one_message_at_a_time(tmp_path: Path) -> None:
    s = store(tmp_path)
    run(s.outbox_put(Outgoing("r2", "b@x.test", "own.test", b"two", 0)))
    run(s.outbox_put(Outgoing("r1", "a@x.test", "own.test", b"one", 1)))
    assert run(s.outbox_keys()) == [("r1", "a@x.test"), ("r2", "b@x.test")]
    assert run(s.outbox_get("r2", "b@x.test")) == Outgoing("r2", "b@x.test", "own.test", b"two", 0)
    assert run(s.outbox_get("r3", "b@x.test")) is None
