"""Slow clients are cut off at their timeouts without starving anyone else; oversized
input is refused without being held in memory."""

from __future__ import annotations

import resource
import smtplib
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.security.helpers import greeted, rss_kb
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient, deliver


def test_slowloris_is_cut_at_the_command_timeout(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, limits={"command_timeout": 2}))
    with greeted(gw.port(), helo=False) as c:
        start = time.monotonic()
        closed_by_peer = False
        reply = b""
        for ch in b"EHLO trickle.test\r\n":
            try:
                c.sock.sendall(bytes([ch]))
                c.sock.settimeout(1.0)  # the pace: one byte a second, the wait is the point
                reply += c.sock.recv(200)
                if reply:
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_by_peer = True
                break
        elapsed = time.monotonic() - start
        assert reply.startswith(b"421 4.4.2") or closed_by_peer, reply
        assert elapsed < 4.5  # the deadline is per command, trickling does not extend it


def test_client_stopping_mid_data_is_cut_and_nothing_delivered(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, limits={"data_timeout": 2}))
    with greeted(gw.port()) as c:
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<x@example.test>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: half\r\n\r\nthe first half, then silence\r\n")
        start = time.monotonic()
        code, text = c.reply()
        assert code == 421 and text.startswith("421 4.4.2"), text
        assert 1.5 < time.monotonic() - start < 5
        assert c.closed()
    assert backend.messages() == []


def test_a_thousand_slow_clients_do_not_stop_a_normal_one(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    cfg = base_config(backend.url, limits={"command_timeout": 60})
    cfg["listeners"][0]["max_connections"] = 2000
    gw = gateway_factory(cfg)
    baseline = len(list(Path(f"/proc/{gw.proc.pid}/fd").iterdir()))
    slow: list[socket.socket] = []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", gw.port()), timeout=10)
            s.sendall(b"E")  # and then nothing more for a minute
            slow.append(s)
        start = time.monotonic()
        code, _ = deliver(gw.port(), b"Subject: normal\r\n\r\nhello\r\n")
        assert code == 250
        assert time.monotonic() - start < 5
        assert len(backend.messages()) == 1
    finally:
        for s in slow:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Every one of those sockets is released: file descriptors back to where they were.
    fds = Path(f"/proc/{gw.proc.pid}/fd")
    deadline = time.monotonic() + 10
    while len(list(fds.iterdir())) > baseline + 5:
        assert time.monotonic() < deadline, f"{len(list(fds.iterdir()))} fds, was {baseline}"
        time.sleep(0.1)


def test_oversized_message_is_refused_without_being_held(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, limits={"max_message_size": 1_048_576}))
    pid = gw.proc.pid
    before = rss_kb(pid)
    with greeted(gw.port(), timeout=60) as c:
        c.cmd("MAIL FROM:<a@sender.test>")  # no SIZE=: the client lies by omission
        c.cmd("RCPT TO:<x@example.test>")
        assert c.cmd("DATA")[0] == 354
        line = b"x" * 998 + b"\r\n"
        peak = 0
        for _ in range(60):  # 60 MB
            c.send(line * 1000)
            peak = max(peak, rss_kb(pid))
        c.send(b".\r\n")
        code, text = c.reply()
        assert code == 552 and text.startswith("552 5.3.4"), text
        assert c.cmd("NOOP")[0] == 250  # the session goes on
    assert backend.messages() == []
    assert peak - before < 16_000, f"RSS grew {peak - before} kB for a 1 MB limit"


def test_memory_stays_bounded_while_refusing_a_flood(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    pid = gw.proc.pid
    deliver(gw.port(), b"Subject: warm\r\n\r\nx\r\n")  # warm up imports and pools
    before = rss_kb(pid)
    for _ in range(300):
        with greeted(gw.port()) as c:
            c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<x@remote.test>\r\n" + b"JUNK\r\n" * 30)
            while c.reply()[0] not in (0, 421):
                pass
    after = rss_kb(pid)
    assert after - before < 15_000, f"RSS grew {after - before} kB over 300 refused sessions"
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:  # and it still serves
        assert s.noop()[0] == 250


def _wait_metric(gw: Gateway, name: str, pred: Callable[[float], bool]) -> float:
    """Poll /metrics until `name` satisfies `pred` (a scrape flushes the answering
    process's figures, so with one worker each reading is exact)."""
    deadline = time.monotonic() + 10
    while True:
        value = gw.metric(name + " ")
        if pred(value):
            return value
        assert time.monotonic() < deadline, f"{name} stayed at {value}"
        time.sleep(0.05)


def _first_in_flight(gw: Gateway, a: RawClient) -> None:
    """A's 900 KB message in the gateway's memory, its end not sent yet: it holds
    900 KB and at most a reservation step ahead."""
    a.cmd("MAIL FROM:<a@sender.test>")
    a.cmd("RCPT TO:<x@example.test>")
    assert a.cmd("DATA")[0] == 354
    a.send(b"Subject: first\r\n\r\n" + (b"x" * 998 + b"\r\n") * 900)
    _wait_metric(gw, "smtp_gateway_message_memory_bytes", lambda v: v >= 900_000)


def test_messages_beyond_the_memory_budget_get_452_and_the_rest_goes_through(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """The gateway holds each message in memory until the backend answers. With
    the budget taken by one large message in flight, and no wait for room
    (`data_memory_wait: 0`), another that does not fit is refused with 452 4.3.1
    (at MAIL when its SIZE says so, else at its end; 552 5.3.4 if it was too big
    as well), the session stays in step, the first is delivered, and once it is
    through the refused one is taken."""
    limits = {"max_message_size": 1_000_000, "max_data_memory": 1_500_000, "data_memory_wait": 0}
    gw = gateway_factory(base_config(backend.url, limits=limits))
    assert gw.metric("smtp_gateway_message_memory_limit_bytes ") == 1_500_000
    line = b"x" * 998 + b"\r\n"
    second = b"Subject: second\r\n\r\n" + line * 700  # 700 KB
    too_big = b"Subject: big\r\n\r\n" + line * 1200
    with greeted(gw.port(), timeout=30) as a:
        _first_in_flight(gw, a)  # under 600 KB of the budget is left
        with greeted(gw.port(), timeout=30) as b:
            code, text = b.cmd("MAIL FROM:<b@sender.test> SIZE=700000")
            assert code == 452 and text.startswith("452 4.3.1"), text
            # Without SIZE= we find out as it comes: out of room, the rest is discarded,
            # and the refusal is 452; or 552 if it also ran past the 1 MB limit, the
            # permanent reason, so that its sender is not left retrying.
            for message, refusal in ((second, "452 4.3.1"), (too_big, "552 5.3.4")):
                assert b.cmd("MAIL FROM:<b@sender.test>")[0] == 250
                assert b.cmd("RCPT TO:<y@example.test>")[0] == 250
                assert b.cmd("DATA")[0] == 354
                b.send(message + b".\r\n")
                code, text = b.reply()
                assert text.startswith(refusal), text
                assert b.cmd("NOOP")[0] == 250  # in step after the discarded transfer
        a.send(b".\r\n")
        code, text = a.reply()
        assert code == 250, text
    assert [m["rcpt_tos"] for m in backend.messages()] == [["x@example.test"]]
    _wait_metric(gw, "smtp_gateway_message_memory_bytes", lambda v: v == 0)
    deferred = 'smtp_gateway_transactions_total{outcome="tempfailed",reason="no_memory"}'
    assert gw.metric(deferred) == 2
    refused = 'smtp_gateway_transactions_total{outcome="rejected",reason="size_exceeded"}'
    assert gw.metric(refused) == 1
    code, _ = deliver(gw.port(), second, sender="b@sender.test", rcpts=("y@example.test",))
    assert code == 250
    assert len(backend.messages()) == 2


def test_a_mail_waits_its_turn_for_memory_and_is_then_delivered(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """With the budget taken by a message in flight, a MAIL whose SIZE= does not
    fit waits (limits.data_memory_wait) instead of being refused, and is answered
    250 once the first message is through: at a peak, the client is delivered
    in seconds instead of retrying after minutes."""
    limits = {"max_message_size": 1_000_000, "max_data_memory": 1_500_000}
    gw = gateway_factory(base_config(backend.url, limits=limits))
    line = b"x" * 998 + b"\r\n"
    with greeted(gw.port(), timeout=30) as a, greeted(gw.port(), timeout=30) as b:
        _first_in_flight(gw, a)
        b.send(b"MAIL FROM:<b@sender.test> SIZE=700000\r\n")
        _wait_metric(gw, "smtp_gateway_message_memory_waiters", lambda v: v == 1)
        a.send(b".\r\n")
        assert a.reply()[0] == 250
        code, text = b.reply()  # the MAIL's answer, once A's message left memory
        assert code == 250, text
        assert b.cmd("RCPT TO:<y@example.test>")[0] == 250
        assert b.cmd("DATA")[0] == 354
        b.send(b"Subject: second\r\n\r\n" + line * 600 + b".\r\n")
        code, text = b.reply()
        assert code == 250, text
    assert len(backend.messages()) == 2
    assert gw.metric('smtp_gateway_message_memory_waits_total{result="admitted"}') == 1
    [ready] = [e for e in gw.events() if e.get("event") == "ready"]
    assert ready["max_data_memory"] == 1_500_000  # the budget, in the start-up line
    _wait_metric(gw, "smtp_gateway_message_memory_waiters", lambda v: v == 0)


def test_a_drain_tells_a_mail_waiting_for_memory_at_once(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """A MAIL waiting for room has no transaction yet: on SIGTERM it gets 421 4.3.2
    at once, as an idle session does, while the message in flight is delivered."""
    import signal

    limits = {"max_message_size": 1_000_000, "max_data_memory": 1_500_000}
    gw = gateway_factory(base_config(backend.url, limits=limits, drain_timeout=20))
    with greeted(gw.port(), timeout=30) as a, greeted(gw.port(), timeout=30) as b:
        _first_in_flight(gw, a)
        b.send(b"MAIL FROM:<b@sender.test> SIZE=700000\r\n")
        _wait_metric(gw, "smtp_gateway_message_memory_waiters", lambda v: v == 1)
        start = time.monotonic()
        gw.signal(signal.SIGTERM)
        code, text = b.reply()
        assert code == 421 and text.startswith("421 4.3.2"), text
        assert time.monotonic() - start < 10  # not at the end of its 30 s wait
        a.send(b".\r\n")
        code, text = a.reply()
        assert code == 250, text
    assert [m["rcpt_tos"] for m in backend.messages()] == [["x@example.test"]]
    assert gw.proc.wait(20) == 0


def test_an_idle_mail_holds_its_declared_size_only_for_the_wait(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """An admitted SIZE= is pledged to its transaction, so the room is not promised
    twice; but a MAIL line with no bytes after it holds that room only for
    `data_memory_wait` seconds, or a client could take the budget with a few idle
    sessions. Past that, the next in line gets it, and the idle client's message,
    if it comes, is charged as it arrives."""
    limits = {"max_message_size": 1_000_000, "max_data_memory": 1_500_000, "data_memory_wait": 1}
    gw = gateway_factory(base_config(backend.url, limits=limits))
    with greeted(gw.port(), timeout=30) as a, greeted(gw.port(), timeout=30) as c:
        assert a.cmd("MAIL FROM:<a@sender.test> SIZE=1000000")[0] == 250  # and then nothing
        assert a.cmd("RCPT TO:<x@example.test>")[0] == 250
        start = time.monotonic()
        code, text = c.cmd("MAIL FROM:<c@sender.test> SIZE=1000000")
        waited = time.monotonic() - start
        assert code == 250, text  # A's pledge lapsed within C's wait
        assert 0.5 < waited < 5, waited  # it did wait: the room was pledged to A
        assert c.cmd("RCPT TO:<y@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: fits\r\n\r\n" + b"z" * 998 + b"\r\n.\r\n")
        assert c.reply()[0] == 250
        assert a.cmd("DATA")[0] == 354
        a.send(b"Subject: late\r\n\r\n" + b"w" * 998 + b"\r\n.\r\n")
        assert a.reply()[0] == 250
        code, text = c.cmd("MAIL FROM:<c@sender.test> SIZE=1500001")
        assert code == 552 and text.startswith("552 5.3.4"), text  # over the size limit first
    assert len(backend.messages()) == 2
