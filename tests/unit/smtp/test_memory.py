"""The process's budget for message data: what it lets through, what it refuses,
and that every byte charged comes back."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import replies
from gateway.config import BareLinefeed
from gateway.smtp.data import DataRefused, read_message
from gateway.smtp.memory import CHUNK, MessageMemory, Reservation, auto_limit, available_memory
from gateway.smtp.protocol import Receiver
from gateway.stream import Stream


def test_a_message_that_fits_is_held_at_its_size_and_released() -> None:
    mem = MessageMemory(10_000)
    r = Reservation(mem)
    assert r.fit(4_000)
    assert (mem.used, r.held, mem.available) == (4_000, 4_000, 6_000)
    r.release()
    r.release()  # twice is harmless: every way out of a transaction may release
    assert (mem.used, r.held) == (0, 0)


def test_what_others_hold_decides_whether_a_message_fits() -> None:
    mem = MessageMemory(10_000)
    a, b = Reservation(mem), Reservation(mem)
    assert a.fit(7_000)
    assert not b.fit(3_001)
    assert b.held == 0 and mem.used == 7_000
    b.release()
    assert b.fit(3_000)  # exactly the rest
    assert mem.available == 0
    a.release()
    b.release()
    assert mem.used == 0


def test_growing_reserves_ahead_but_never_past_the_limit() -> None:
    mem = MessageMemory(CHUNK * 3)
    a, b = Reservation(mem), Reservation(mem)
    assert a.grow(1_000)
    assert a.held == 1_000 + CHUNK  # room for the next reads without asking again
    assert a.grow(CHUNK)  # within what it holds: nothing changes
    assert a.held == 1_000 + CHUNK
    assert b.grow(CHUNK)
    assert mem.used <= mem.limit
    # b holds what is left after a; a cannot grow into it.
    assert not a.grow(mem.limit - b.held + 1)
    assert mem.used <= mem.limit
    # a's final size is what it read, not what it reserved ahead.
    assert a.fit(5_000) and a.held == 5_000
    a.release()
    b.release()
    assert mem.used == 0


def test_a_transfer_that_outgrows_the_budget_is_discarded_in_step() -> None:
    """The reader stops holding the message once the budget cannot take it, reads
    on to its end (the session stays in step) and refuses it with 452 4.3.1."""
    chunk = b"x" * 998 + b"\r\n"
    chunk *= 64  # 64 KB
    buffered: list[int] = []

    async def go() -> tuple[DataRefused, int, bytes]:
        mem = MessageMemory(CHUNK * 2)
        other = Reservation(mem)
        assert other.fit(CHUNK)  # another transaction holds half
        r = Reservation(mem)
        s = Stream()

        async def feed() -> None:
            for c in [chunk] * 8 + [b".\r\nNOOP\r\n"]:  # 512 KB, then the end
                await asyncio.sleep(0)  # a turn of the loop: the reader looks in between
                buffered.append(s.pending)
                s.data_received(c)

        feeder = asyncio.create_task(feed())
        with pytest.raises(DataRefused) as ei:
            await read_message(s, Receiver(s.buffer), 10 * CHUNK, BareLinefeed.REJECT, r)
        await feeder
        return ei.value, mem.used, await s.readline(100)

    refused, used, after = asyncio.run(go())
    assert refused.reply is replies.NO_MEMORY
    assert str(refused.reply).startswith("452 4.3.1")
    assert used == CHUNK  # only the other transaction's share is left
    assert after == b"NOOP"
    # Discarded as it arrived: the buffer never held more than the room there was.
    assert max(buffered) <= CHUNK + len(chunk), buffered


def test_a_message_out_of_room_and_then_too_big_gets_552() -> None:
    """Discarded because the budget was short, it then ran past the size limit:
    552 5.3.4, the permanent answer, not 452. A retry could only be refused again,
    and the sender learns what to change (smtp/data.py read_message)."""
    chunk = b"x" * 998 + b"\r\n"
    chunk *= 64  # 64 KB

    async def go() -> tuple[DataRefused, int, bytes]:
        mem = MessageMemory(CHUNK * 2)
        other = Reservation(mem)
        assert other.fit(CHUNK)
        r = Reservation(mem)
        s = Stream()

        async def feed() -> None:
            for c in [chunk] * 8 + [b".\r\nNOOP\r\n"]:  # 512 KB, then the end
                await asyncio.sleep(0)
                s.data_received(c)

        feeder = asyncio.create_task(feed())
        with pytest.raises(DataRefused) as ei:
            # The limit is above the room, below the message: room runs out first.
            await read_message(s, Receiver(s.buffer), 6 * len(chunk), BareLinefeed.REJECT, r)
        await feeder
        return ei.value, mem.used, await s.readline(100)

    refused, used, after = asyncio.run(go())
    assert CHUNK < 6 * len(chunk) < 8 * len(chunk)
    assert refused.reply is replies.SIZE_EXCEEDED
    assert str(refused.reply).startswith("552 5.3.4")
    assert used == CHUNK
    assert after == b"NOOP"


def test_a_message_read_whole_is_refused_if_it_does_not_fit() -> None:
    """A message that was already in the buffer when the reader looked (no wait,
    so no growing) is still held to the budget."""
    mem = MessageMemory(5_000)
    s = Stream()
    s.data_received(b"Subject: x\r\n\r\n" + b"y" * 6_000 + b"\r\n.\r\nQUIT\r\n")
    r = Reservation(mem)
    with pytest.raises(DataRefused) as ei:
        asyncio.run(read_message(s, Receiver(s.buffer), 100_000, BareLinefeed.REJECT, r))
    assert ei.value.reply is replies.NO_MEMORY
    assert mem.used == 0
    assert asyncio.run(s.readline(100)) == b"QUIT"


def test_size_limit_is_still_a_552_when_memory_is_plenty() -> None:
    s = Stream()
    s.data_received(b"z" * 3_000 + b"\r\n.\r\n")
    r = Reservation(MessageMemory(1 << 30))
    with pytest.raises(DataRefused) as ei:
        asyncio.run(read_message(s, Receiver(s.buffer), 1_000, BareLinefeed.REJECT, r))
    assert ei.value.reply is replies.SIZE_EXCEEDED
    assert r.held == 0


def test_automatic_budget_is_a_share_of_memory_per_worker() -> None:
    total = available_memory()
    assert 0 < total <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert auto_limit(1, 1024) == total // 4
    assert auto_limit(2, 1024) == total // 4 // 2
    # Never below one message of the largest size: such a message must stay possible.
    assert auto_limit(1, total) == total


def test_a_failed_fit_does_not_turn_a_later_oversize_into_a_452() -> None:
    """Only a transfer that outgrew the budget is a memory refusal: after a fit
    that failed, a message over max_message_size still gets the size limit's 552."""
    mem = MessageMemory(10_000)
    r = Reservation(mem)
    assert not r.fit(20_000)  # the first MAIL's SIZE=
    assert r.fit(5_000)  # the second MAIL's
    s = Stream()
    s.data_received(b"w" * 8_000 + b"\r\n.\r\n")
    with pytest.raises(DataRefused) as ei:
        asyncio.run(read_message(s, Receiver(s.buffer), 6_000, BareLinefeed.REJECT, r))
    assert ei.value.reply is replies.SIZE_EXCEEDED


# -- admission at MAIL: pledges and the wait for room ---------------------------------


def test_an_admitted_size_is_pledged_until_its_bytes_take_its_place() -> None:
    mem = MessageMemory(10_000, wait=30)
    a, b = Reservation(mem), Reservation(mem)
    assert a.admit(6_000)
    assert (a.pledge, mem.pledged, mem.available) == (6_000, 6_000, 4_000)
    assert not b.admit(5_000)  # the room A was promised is not promised again
    assert b.admit(0)  # no SIZE=: any room will do, and nothing is pledged
    assert b.pledge == 0
    assert a.fit(5_500)  # the message came, smaller than declared
    assert (a.pledge, a.held, mem.pledged, mem.used) == (0, 5_500, 0, 5_500)
    a.release()
    b.release()
    assert (mem.used, mem.pledged, mem.available) == (0, 0, 10_000)


def test_a_message_growing_into_its_pledge_is_not_refused_for_it() -> None:
    mem = MessageMemory(CHUNK * 4, wait=30)
    a, other = Reservation(mem), Reservation(mem)
    assert a.admit(CHUNK * 3)
    assert not other.grow(CHUNK + 1)  # only a CHUNK is left beside the pledge
    assert a.grow(1_000)
    # The pledge became bytes held: the whole declared size, ahead of its arrival.
    assert (a.pledge, mem.pledged, a.held) == (0, 0, CHUNK * 3)
    assert a.grow(CHUNK * 3)
    a.release()
    assert (mem.used, mem.pledged) == (0, 0)


def test_without_a_wait_nothing_is_pledged() -> None:
    """limits.data_memory_wait: 0 keeps SIZE= a check only."""
    mem = MessageMemory(10_000)
    a, b = Reservation(mem), Reservation(mem)
    assert a.admit(6_000) and a.pledge == 0
    assert b.admit(6_000)
    assert not b.admit(10_001)


def test_waiting_mails_are_admitted_in_turn_as_room_comes_free() -> None:
    async def go() -> list[str]:
        mem = MessageMemory(10_000, wait=30)
        holder, big, small = Reservation(mem), Reservation(mem), Reservation(mem)
        assert holder.fit(8_000)
        order: list[str] = []

        async def mail(name: str, r: Reservation, size: int) -> None:
            if r.admit(size) or await r.wait_admit(size):
                order.append(name)

        t_big = asyncio.create_task(mail("big", big, 5_000))
        await asyncio.sleep(0)
        # 1,000 would fit now, but a newcomer does not overtake a waiter.
        t_small = asyncio.create_task(mail("small", small, 1_000))
        await asyncio.sleep(0)
        assert mem.waiting == 2 and order == []
        holder.release()
        # Promptly, not at the end of a 30 s wait: each admission wakes the next.
        await asyncio.wait_for(asyncio.gather(t_big, t_small), 5)
        assert (mem.waiting, mem.pledged) == (0, 6_000)
        return order

    assert asyncio.run(go()) == ["big", "small"]


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async def go() -> None:
        mem = MessageMemory(10_000, wait=30)
        holder, big, small = Reservation(mem), Reservation(mem), Reservation(mem)
        assert holder.fit(8_000)
        t_big = asyncio.create_task(big.wait_admit(5_000))
        await asyncio.sleep(0)
        t_small = asyncio.create_task(small.wait_admit(1_000))
        await asyncio.sleep(0)
        t_big.cancel()  # its client went away, or the gateway drains
        # Fits beside the holder: admitted at once, without a release.
        assert await asyncio.wait_for(t_small, 5)
        assert t_big.cancelled() and mem.waiting == 0
        assert (small.pledge, big.pledge) == (1_000, 0)

    asyncio.run(go())


def test_a_wait_ends_in_refusal_when_no_room_comes() -> None:
    async def go() -> None:
        mem = MessageMemory(10_000, wait=0.2)
        holder, r = Reservation(mem), Reservation(mem)
        assert holder.fit(8_000)
        start = time.monotonic()
        assert not await r.wait_admit(5_000)
        assert time.monotonic() - start >= 0.2
        assert (mem.waiting, r.pledge, mem.pledged) == (0, 0, 0)

    asyncio.run(go())


def test_a_pledge_without_bytes_lapses_and_its_room_goes_to_the_next_in_line() -> None:
    """A client cannot hold the budget with a MAIL line and no bytes for longer
    than the wait: the pledge lapses, and a waiter gets its room without anyone
    releasing anything."""

    async def go() -> None:
        mem = MessageMemory(10_000, wait=0.3)
        idle, waiter = Reservation(mem), Reservation(mem)
        assert idle.admit(8_000)  # MAIL ... SIZE=8000, and then nothing
        assert not waiter.admit(5_000)
        assert await waiter.wait_admit(5_000)
        assert (idle.pledge, waiter.pledge, mem.pledged) == (0, 5_000, 5_000)
        # The idle client's message, if it ever comes, is charged as it arrives.
        assert idle.fit(5_000) and mem.available == 0

    asyncio.run(go())


_op = st.tuples(
    st.sampled_from(["admit", "grow", "fit", "release", "lapse"]),
    st.integers(0, 3),  # which transaction
    st.integers(0, 12_000),  # a size
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60))
def test_the_budget_is_never_overcommitted_and_always_comes_back(ops: list[Any]) -> None:
    """Whatever the order of MAILs, transfers, ends and lapses: held and pledged
    bytes together never pass the limit, each transaction's share adds up to the
    totals, and once every transaction has ended nothing is held or pledged."""
    mem = MessageMemory(10_000, wait=30)
    rs = [Reservation(mem) for _ in range(4)]
    for op, i, size in ops:
        r = rs[i]
        if op == "admit":
            r.admit(size)  # (the handler admits a MAIL only after a release)
        elif op == "grow":
            r.grow(size)
        elif op == "fit":
            r.fit(size)
        elif op == "release":
            r.release()
        else:
            mem.lapse(time.monotonic() + 31)  # every pledge's time has passed
        assert mem.used + mem.pledged <= mem.limit
        assert mem.used == sum(x.held for x in rs) and mem.pledged == sum(x.pledge for x in rs)
        assert all(x.held >= 0 and x.pledge >= 0 for x in rs)
    for r in rs:
        r.release()
    assert (mem.used, mem.pledged, mem.available) == (0, 0, mem.limit)


def test_many_clients_at_once_are_admitted_in_order_and_the_budget_holds() -> None:
    """Forty MAILs of random sizes against a budget for a few: every one is admitted
    in the order it came (none overtakes, none is lost from the line), the budget
    is never overcommitted on the way, and all of it comes back."""
    import random

    rnd = random.Random(7)

    async def go() -> None:
        mem = MessageMemory(10_000, wait=30)
        arrived: list[int] = []
        admitted: list[int] = []

        async def client(n: int, size: int, hold: float) -> None:
            r = Reservation(mem)
            arrived.append(n)
            if not r.admit(size):
                assert await r.wait_admit(size)
            admitted.append(n)
            assert mem.used + mem.pledged <= mem.limit
            await asyncio.sleep(hold)  # the transfer and the backend's reply
            assert r.fit(size)
            assert mem.used + mem.pledged <= mem.limit
            await asyncio.sleep(hold)
            r.release()

        start = time.monotonic()
        tasks = []
        for n in range(40):
            tasks.append(
                asyncio.create_task(client(n, rnd.randint(500, 6_000), rnd.random() / 200))
            )
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        # The line moves as room comes free: nobody sits out its 30 s wait.
        assert time.monotonic() - start < 10
        assert admitted == arrived == list(range(40))
        assert (mem.used, mem.pledged, mem.waiting) == (0, 0, 0)

    asyncio.run(go())


def test_a_message_is_not_refused_for_a_pledge_whose_time_has_passed() -> None:
    """A lapsed pledge is dropped when it stands in the way, not only at the next MAIL."""
    mem = MessageMemory(10_000, wait=1e-9)  # every pledge lapses at once
    idle, sender = Reservation(mem), Reservation(mem)
    assert idle.admit(8_000) and mem.pledged == 8_000
    assert sender.fit(6_000)  # whole in the buffer: charged at its end
    assert (idle.pledge, mem.pledged, mem.used) == (0, 0, 6_000)
    sender.release()
    assert idle.admit(8_000)
    assert sender.grow(6_000)  # arriving: charged as it grows
    assert idle.pledge == 0 and sender.held >= 6_000
