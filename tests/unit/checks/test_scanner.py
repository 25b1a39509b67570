"""The content scanners' shared base (gateway/checks/scanner.py) with a fake
scanner over a fake transport: the endpoint forms, the size bound, the bound on
scans in flight, the deadline, the mapping of failures to symbols and metrics,
the connection pool, trusted clients, and one scan per transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from gateway import config, metrics
from gateway.checks.relay import RelayCheck
from gateway.checks.scanner import (
    Connection,
    ConnectionPool,
    Endpoint,
    Scanner,
    ScannerOptions,
    ScannerProtocolError,
    ScannerUnavailable,
    ScanResult,
    parse_endpoint,
    scanner_symbols,
)
from gateway.context import Context
from gateway.pipeline.policy import Policy
from gateway.pipeline.runner import Runner
from gateway.smtp.local import AcceptingBackend, LocalSession, plain_listener, services
from gateway.vocab import Stage

pytestmark = pytest.mark.unit


def sample(name: str, **labels: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- a fake transport ------------------------------------------------------------------


class FakeWriter:
    """The writing half of a fake connection: what is written goes to `peer` (the
    fake scanner), which answers by feeding the connection's reader."""

    def __init__(self, peer: Callable[[bytes], None]) -> None:
        self.peer = peer
        self.sent = bytearray()
        self.closed = False
        self.peer_closed = False  # the scanner closed: writes are lost, drain fails

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.peer_closed:
            self.closed = True  # as an asyncio transport does when a write fails
        if self.closed:
            return
        self.sent += data
        self.peer(bytes(data))

    async def drain(self) -> None:
        if self.peer_closed:
            raise ConnectionResetError("Connection lost")
        await asyncio.sleep(0)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class FakePeer:
    """One fake scanner connection: `answer(peer, data)` is called with each write."""

    def __init__(self, answer: Callable[[FakePeer, bytes], None]) -> None:
        self.reader = asyncio.StreamReader(limit=64 * 1024)
        self.writer = FakeWriter(lambda data: answer(self, data))
        self.received = bytearray()
        self.conn = Connection(self.reader, self.writer)  # type: ignore[arg-type]

    def reply(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def hang_up(self) -> None:
        """The scanner closes its end."""
        self.writer.peer_closed = True
        self.reader.feed_eof()


class FakePool(ConnectionPool):
    """A pool whose new connections go to a fake scanner: `answer` (per pool) is the
    scanner's behaviour; None refuses the connection."""

    def __init__(self, endpoint: Endpoint, keep: int, scanner: str) -> None:
        super().__init__(endpoint, keep, scanner)
        self.answer: Callable[[FakePeer, bytes], None] | None = None
        self.peers: list[FakePeer] = []

    async def connect(self) -> Connection:
        if self.answer is None:
            raise ScannerUnavailable("cannot connect: Connection refused")
        peer = FakePeer(self.answer)
        self.peers.append(peer)
        return peer.conn


# -- a fake scanner ------------------------------------------------------------------


class ProbeOptions(ScannerOptions):
    endpoint: str = "tcp://127.0.0.1:9"


class ProbeScanner(Scanner):
    """Sends `SCAN <n>\\n<message>` and reads one line: `CLEAN`, `BAD <name>`; or
    runs `self.hook` instead when a test sets one."""

    name: ClassVar[str] = "probe"
    symbols: ClassVar[frozenset[str]] = frozenset({"probe.bad"}) | scanner_symbols("probe")
    options_type: ClassVar[type[ScannerOptions]] = ProbeOptions
    pool_type: ClassVar[type[ConnectionPool]] = FakePool

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []
        self.hook: Callable[[Connection], Awaitable[ScanResult]] | None = None

    async def scan(self, ctx: Context, message: bytes, conn: Connection) -> ScanResult:
        self.seen.append(message)
        if self.hook is not None:
            return await self.hook(conn)
        conn.writer.write(b"SCAN %d\n" % len(message) + message)
        await conn.writer.drain()
        line = await conn.reader.readuntil(b"\n")
        if line == b"CLEAN\n":
            return ScanResult((), "clean")
        if line.startswith(b"BAD "):
            return ScanResult(("probe.bad",), "bad", line[4:-1].decode())
        raise ScannerProtocolError(f"what is {line!r}")


def answering(verdicts: dict[bytes, bytes]) -> Callable[[FakePeer, bytes], None]:
    """A scanner that answers a message containing a key with its value, else CLEAN."""

    def answer(peer: FakePeer, data: bytes) -> None:
        peer.received += data
        head, _, rest = bytes(peer.received).partition(b"\n")
        if not head.startswith(b"SCAN ") or len(rest) < int(head[5:]):
            return
        msg = rest[: int(head[5:])]
        del peer.received[: len(head) + 1 + len(msg)]
        for key, reply in verdicts.items():
            if key in msg:
                peer.reply(reply)
                return
        peer.reply(b"CLEAN\n")

    return answer


def probe(**opts: Any) -> ProbeScanner:
    check = ProbeScanner().configured(ProbeOptions(enabled=True, **opts))
    fake = check.pool
    assert isinstance(fake, FakePool)
    fake.answer = answering({b"EVIL": b"BAD Test.Evil\n"})
    return check


def fake_pool(check: Scanner) -> FakePool:
    assert isinstance(check.pool, FakePool)
    return check.pool


def ctx_with(message: bytes, *, trusted: bool = False, deadline: float | None = None) -> Context:
    c = Context("sess", "192.0.2.7", 4000, "smtp", trusted=trusted)
    c.unstuffed(message)
    if deadline is not None:
        c.deadline = deadline
    return c


async def run(check: Scanner, ctx: Context) -> tuple[str, ...]:
    if ctx.deadline == float("inf"):
        ctx.deadline = asyncio.get_running_loop().time() + 30
    out = check.run(Stage.DATA, ctx)
    return tuple(out if isinstance(out, tuple) else await out)


# -- endpoints -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("tcp://127.0.0.1:3310", Endpoint("tcp", "127.0.0.1", 3310)),
        ("tcp://clamd.mail.svc:3310", Endpoint("tcp", "clamd.mail.svc", 3310)),
        ("tcp://[::1]:3310", Endpoint("tcp", "::1", 3310)),
        ("unix:/run/clamav/clamd.ctl", Endpoint("unix", path="/run/clamav/clamd.ctl")),
        ("unix:///run/clamav/clamd.ctl", Endpoint("unix", path="/run/clamav/clamd.ctl")),
        ("http://127.0.0.1:11333", Endpoint("http", "127.0.0.1", 11333)),
        ("http://127.0.0.1:11333/", Endpoint("http", "127.0.0.1", 11333)),
    ],
)
def test_endpoint_forms(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint
    assert parse_endpoint(str(endpoint)) == endpoint  # its own spelling reads back


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:3310",  # no scheme
        "tcp://127.0.0.1",  # no port
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65536",
        "tcp://:3310",
        "tcp:127.0.0.1:3310",
        "unix:clamd.ctl",  # relative
        "unix:/" + "x" * 120,  # past sun_path
        "ftp://127.0.0.1:21",
        "http://127.0.0.1:11333/checkv2",  # a path is the scanner's business
    ],
)
def test_endpoint_mistakes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"use|absolute|at most"):
        parse_endpoint(text)


def test_an_endpoint_error_names_the_key_and_the_forms_the_scanner_takes() -> None:
    """The clamav options take tcp and unix only: an http endpoint is a mistake
    named under its key."""
    with pytest.raises(ValidationError) as e:
        Policy.model_validate({"checks": {"clamav": {"endpoint": "http://127.0.0.1:3310"}}})
    text = config.format_validation_error(e.value, "policy.yaml")
    assert "policy.yaml: checks.clamav.endpoint:" in text
    assert "use tcp://HOST:PORT or unix:/PATH" in text


# -- one scan ---------------------------------------------------------------------------


def test_a_verdict_becomes_symbols_and_facts() -> None:
    async def go() -> None:
        check = probe()
        bad = ctx_with(b"Subject: x\r\n\r\nEVIL\r\n")
        assert await run(check, bad) == ("probe.bad",)
        [f] = bad.facts.scans
        assert (f.scanner, f.verdict, f.detail, f.symbols) == (
            "probe",
            "bad",
            "Test.Evil",
            ("probe.bad",),
        )
        good = ctx_with(b"Subject: x\r\n\r\nfine\r\n")
        assert await run(check, good) == ()
        assert [(f.verdict, f.detail) for f in good.facts.scans] == [("clean", "")]

    asyncio.run(go())


def test_a_message_over_max_size_is_not_sent() -> None:
    async def go() -> None:
        check = probe(max_size=100)
        before = sample("smtp_gateway_scan_seconds_count", scanner="probe")
        c = ctx_with(b"x" * 101)
        # Answered at once, without a coroutine: nothing to wait for.
        assert check.run(Stage.DATA, c) == ("probe.too_big",)
        assert check.seen == [] and fake_pool(check).peers == []
        assert c.facts.scans[0].verdict == "too_big"
        assert sample("smtp_gateway_scan_seconds_count", scanner="probe") == before
        assert await run(check, ctx_with(b"x" * 100)) == ()  # at the bound: scanned
        assert len(check.seen) == 1

    asyncio.run(go())


def test_max_size_counts_as_the_gateways_size_limit_does() -> None:
    """Without the CRLF that ends the last line, as limits.max_message_size counts:
    a message the gateway took at exactly its limit is scanned by a scanner whose
    max_size equals that limit (counted with the CRLF it was 2 bytes over, and the
    default too_big: accept delivered it unscanned)."""

    async def go() -> None:
        check = probe(max_size=100)
        assert await run(check, ctx_with(b"x" * 98 + b"\r\n")) == ()
        assert await run(check, ctx_with(b"x" * 100 + b"\r\n")) == ()  # at the bound
        assert len(check.seen) == 2
        assert check.run(Stage.DATA, ctx_with(b"x" * 101 + b"\r\n")) == ("probe.too_big",)
        assert len(check.seen) == 2

    asyncio.run(go())


def test_trusted_clients_skip_the_scan_unless_scan_trusted() -> None:
    async def go() -> None:
        check = probe()
        c = ctx_with(b"EVIL", trusted=True)
        assert check.run(Stage.DATA, c) == ()
        assert check.seen == [] and c.facts.scans[0].verdict == "skipped"
        scanning = probe(scan_trusted=True)
        assert await run(scanning, ctx_with(b"EVIL", trusted=True)) == ("probe.bad",)

    asyncio.run(go())


@pytest.mark.parametrize(
    ("answer", "kind", "detail"),
    [
        (None, "unavailable", "Connection refused"),
        (lambda p, d: p.hang_up(), "unavailable", "Connection lost"),
        (lambda p, d: p.reply(b"WHAT\n"), "protocol", "what is"),
    ],
    ids=["refused", "hung-up", "garbled"],
)
def test_failures_are_unavailable_counted_by_kind(
    answer: Callable[[FakePeer, bytes], None] | None, kind: str, detail: str
) -> None:
    async def go() -> None:
        check = probe()
        fake_pool(check).answer = answer
        before = sample("smtp_gateway_scanner_errors_total", scanner="probe", kind=kind)
        c = ctx_with(b"hello")
        assert await run(check, c) == ("probe.unavailable",)
        assert c.facts.scans[0].verdict == "unavailable"
        assert detail in c.facts.scans[0].detail
        assert sample("smtp_gateway_scanner_errors_total", scanner="probe", kind=kind) == before + 1
        # A connection that failed is never kept for the next scan.
        assert fake_pool(check).idle == []
        assert all(p.writer.closed for p in fake_pool(check).peers)

    asyncio.run(go())


def test_no_answer_by_the_deadline_is_a_timeout_and_the_connection_is_dropped() -> None:
    """The runner's deadline (Context.deadline) bounds the scan: a scanner that
    never answers gives `<name>.timeout` at it, without waiting any longer (the
    deadline here has passed already: the first wait ends the scan)."""

    async def go() -> None:
        check = probe()
        fake_pool(check).answer = lambda p, d: None  # reads, never answers
        before = sample("smtp_gateway_scanner_errors_total", scanner="probe", kind="timeout")
        c = ctx_with(b"hello", deadline=asyncio.get_running_loop().time())
        assert await run(check, c) == ("probe.timeout",)
        assert c.facts.scans[0].verdict == "timeout"
        after = sample("smtp_gateway_scanner_errors_total", scanner="probe", kind="timeout")
        assert after == before + 1
        [peer] = fake_pool(check).peers
        assert peer.writer.closed and fake_pool(check).idle == []

    asyncio.run(go())


# -- concurrency --------------------------------------------------------------------


def test_scans_in_flight_are_bounded_and_the_rest_wait_their_turn() -> None:
    async def go() -> None:
        check = probe(max_concurrent=2)
        gate = asyncio.Event()
        in_flight, most = 0, 0

        async def held(conn: Connection) -> ScanResult:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await gate.wait()
            in_flight -= 1
            return ScanResult((), "clean")

        check.hook = held
        scans = [asyncio.ensure_future(run(check, ctx_with(b"m%d" % i))) for i in range(5)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert (in_flight, len(check.seen)) == (2, 2)  # two scanning, three waiting
        gate.set()
        assert await asyncio.gather(*scans) == [()] * 5
        assert most == 2 and len(check.seen) == 5

    asyncio.run(go())


def test_a_scan_waiting_for_a_slot_past_the_deadline_is_a_timeout() -> None:
    async def go() -> None:
        check = probe(max_concurrent=1)
        gate = asyncio.Event()

        async def held(conn: Connection) -> ScanResult:
            await gate.wait()
            return ScanResult((), "clean")

        check.hook = held
        first = asyncio.ensure_future(run(check, ctx_with(b"first")))
        await asyncio.sleep(0)
        late = ctx_with(b"second", deadline=asyncio.get_running_loop().time())
        assert await run(check, late) == ("probe.timeout",)
        assert check.seen == [b"first"]  # the second never reached the scanner
        gate.set()
        assert await first == ()

    asyncio.run(go())


# -- connections ------------------------------------------------------------------------


def test_connections_are_kept_up_to_keep_connections_and_reused() -> None:
    async def go() -> None:
        check = probe(keep_connections=1)
        pool = fake_pool(check)
        for i in range(3):
            assert await run(check, ctx_with(b"m%d" % i)) == ()
        assert pool.opened == 1 and len(pool.idle) == 1  # one connection, three scans
        # Two at once need two connections; only one is kept afterwards.
        await asyncio.gather(run(check, ctx_with(b"a")), run(check, ctx_with(b"b")))
        assert pool.opened == 2 and len(pool.idle) == 1
        assert sum(p.writer.closed for p in pool.peers) == 1

    asyncio.run(go())


def test_keep_connections_zero_opens_one_per_scan() -> None:
    async def go() -> None:
        check = probe(keep_connections=0)
        for i in range(3):
            assert await run(check, ctx_with(b"m%d" % i)) == ()
        assert fake_pool(check).opened == 3 and fake_pool(check).idle == []

    asyncio.run(go())


def test_a_kept_connection_the_scanner_closed_is_replaced_without_a_failure() -> None:
    """The scanner closed a kept connection (its idle timeout, a restart) and the
    gateway has not seen it yet: the scan goes again over a new connection, once."""

    async def go() -> None:
        check = probe()
        pool = fake_pool(check)
        assert await run(check, ctx_with(b"one")) == ()
        stale = pool.peers[0]
        stale.writer.peer_closed = True  # closed at the far end, the EOF not read yet
        errors = sample("smtp_gateway_scanner_errors_total", scanner="probe", kind="unavailable")
        c = ctx_with(b"EVIL two")
        assert await run(check, c) == ("probe.bad",)
        assert pool.opened == 2 and stale.writer.closed
        after = sample("smtp_gateway_scanner_errors_total", scanner="probe", kind="unavailable")
        assert after == errors

    asyncio.run(go())


def test_a_kept_connection_closed_before_the_answer_is_replaced_once() -> None:
    """The same, as a scanner protocol reports it: ScannerUnavailable (Rspamd's
    `connection closed` before a byte of answer) on a kept connection is tried
    again once; on a new one it is the scan's failure."""

    async def go() -> None:
        check = probe()
        pool = fake_pool(check)

        async def closed_when_kept(conn: Connection) -> ScanResult:
            if conn.uses > 0 or len(pool.peers) > 2:
                raise ScannerUnavailable("connection closed by the scanner")
            return ScanResult((), "clean")

        check.hook = closed_when_kept
        assert await run(check, ctx_with(b"one")) == ()
        assert await run(check, ctx_with(b"two")) == ()  # kept one failed, new one answered
        assert pool.opened == 2
        assert await run(check, ctx_with(b"three")) == ("probe.unavailable",)
        assert pool.opened == 3  # after the kept one, one new one: no third try

    asyncio.run(go())


def test_a_kept_connection_seen_closed_is_not_used() -> None:
    async def go() -> None:
        check = probe()
        pool = fake_pool(check)
        assert await run(check, ctx_with(b"one")) == ()
        pool.peers[0].hang_up()  # the EOF arrived while it was idle
        assert await run(check, ctx_with(b"two")) == ()
        assert pool.opened == 2
        assert pool.peers[0].writer.sent.count(b"SCAN") == 1  # nothing more sent on it

    asyncio.run(go())


def test_a_reload_keeps_the_pool_and_slots_unless_what_they_serve_changes() -> None:
    base = ProbeScanner()
    a = base.configured(ProbeOptions(enabled=True, max_concurrent=3, keep_connections=2))
    b = base.configured(ProbeOptions(enabled=True, max_concurrent=3, keep_connections=5))
    assert b.pool is a.pool and b.slots is a.slots and a.pool is not None
    assert a.pool.keep == 5  # the newest configuration's
    c = base.configured(ProbeOptions(enabled=True, endpoint="tcp://127.0.0.1:10", max_concurrent=4))
    assert c.pool is not a.pool and c.slots is not a.slots
    assert a.pool.closed  # the old endpoint's idle connections are closed; busy ones at release
    assert (a.options.max_concurrent, c.options.max_concurrent) == (3, 4)


# -- through the runner and a session ---------------------------------------------------------


def test_the_runner_counts_the_verdict_once_and_hands_the_scan_its_budget() -> None:
    async def go() -> None:
        check = probe(timeout=3)
        deadlines: list[float] = []

        async def note(conn: Connection) -> ScanResult:
            deadlines.append(ctx.deadline - asyncio.get_running_loop().time())
            return ScanResult(("probe.bad",), "bad", "X")

        check.hook = note
        runner = Runner([check], Policy.model_validate({"actions": {}}))
        before = sample("smtp_gateway_check_results_total", check="probe", symbol="probe.bad")
        ctx = ctx_with(b"hello")
        verdict = await runner.run(Stage.DATA, ctx)
        assert verdict.symbols == ("probe.bad",)
        after = sample("smtp_gateway_check_results_total", check="probe", symbol="probe.bad")
        assert after == before + 1
        assert 2.5 < deadlines[0] <= 3  # the scan's timeout is the runner's budget for it

    asyncio.run(go())


def _settings() -> config.Settings:
    return config.Settings.model_validate(
        {
            "hostname": "mx.gw.test",
            "local_domains": ["example.test"],
            "trusted_networks": [],
            "dns": {"nameservers": ["127.0.0.1:9"]},
        }
    )


def test_one_scan_per_transaction_whatever_the_recipients_and_unstuffed() -> None:
    """DATA-stage checks run once per transaction (smtp/message.py), after the
    whole message is read: three recipients, one scan. The scanner gets the
    message as the recipients will (a line starting with a dot unstuffed), and a
    virus refuses the transaction for all of them."""
    settings = _settings()
    check = probe()

    async def go() -> list[list[str]]:
        policy = Policy.model_validate({"actions": {"probe.bad": "reject"}})
        runner = Runner([RelayCheck(settings.local_domains), check], policy)
        svc = services(settings, runner, AcceptingBackend())
        s = LocalSession(svc, plain_listener(settings, svc), ("192.0.2.7", 4000))
        out = []
        try:
            await s.start()
            await s.send("EHLO client.test")
            for body in (b"..dotted line\r\n", b"EVIL\r\n"):
                await s.send("MAIL FROM:<a@sender.test>")
                for r in ("x@example.test", "y@example.test", "z@example.test"):
                    assert (await s.send(f"RCPT TO:<{r}>"))[0].startswith("250")
                await s.send("DATA")
                out.append(await s.message(b"Subject: s\r\n\r\n" + body))
            return out
        finally:
            await s.close()

    clean, bad = asyncio.run(go())
    assert clean[0].startswith("250")
    assert bad[0] == "550 5.7.1 Message rejected by policy"  # for all three recipients
    assert check.seen == [b"Subject: s\r\n\r\n.dotted line\r\n", b"Subject: s\r\n\r\nEVIL\r\n"]


def test_a_kept_connection_with_unasked_bytes_is_not_reused() -> None:
    """A scanner that sends more than its answer (out of step, or a hostile one
    numbering a verdict in advance): what it sent must not be read as the next
    message's verdict; the connection is dropped and the next scan has a new one."""

    async def go() -> None:
        check = probe()
        pool = fake_pool(check)

        def chatty(peer: FakePeer, data: bytes) -> None:
            answering({})(peer, data)  # CLEAN, as asked
            if len(pool.peers) == 1:
                peer.reply(b"BAD Test.Early\n")  # and a verdict nobody asked for yet

        pool.answer = chatty
        assert await run(check, ctx_with(b"Subject: one\r\n\r\nfine\r\n")) == ()
        assert await run(check, ctx_with(b"Subject: two\r\n\r\nfine\r\n")) == ()
        assert len(pool.peers) == 2  # the first connection was not taken again
        assert pool.peers[0].writer.closed

    asyncio.run(go())


@pytest.mark.parametrize("error", [ValueError, OverflowError])
def test_a_number_past_conversion_in_an_answer_is_a_protocol_error(
    error: type[Exception],
) -> None:
    """int() of 5,000 digits raises ValueError, float() of a huge int OverflowError:
    an answer not understood (<name>.unavailable, as the policy decides), not a
    crash of the check (<name>.error, a traceback, no scan record)."""

    async def go() -> None:
        check = probe()
        before = sample("smtp_gateway_scanner_errors_total", scanner="probe", kind="protocol")

        async def huge(conn: Connection) -> ScanResult:
            raise error("Exceeds the limit (4300 digits) for integer string conversion")

        check.hook = huge
        c = ctx_with(b"Subject: x\r\n\r\nhi\r\n")
        assert await run(check, c) == ("probe.unavailable",)
        assert c.facts.scans[0].verdict == "unavailable"
        assert "not understood" in c.facts.scans[0].detail
        after = sample("smtp_gateway_scanner_errors_total", scanner="probe", kind="protocol")
        assert after == before + 1
        assert fake_pool(check).idle == []

    asyncio.run(go())
