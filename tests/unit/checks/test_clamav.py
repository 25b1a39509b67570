"""The ClamAV check's side of clamd's protocol, against a fake clamd: INSTREAM
framing, IDSESSION numbering over a kept connection, and every reply clamd
gives (the real clamd: tests/integration/test_clamav.py)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest

from gateway.checks.clamav import (
    END,
    ClamavCheck,
    ClamavOptions,
    Reply,
    frames,
    parse_reply,
)
from gateway.checks.scanner import ScannerProtocolError
from gateway.context import Context
from gateway.vocab import Stage
from tests.unit.checks.test_scanner import FakePeer, FakePool

pytestmark = pytest.mark.unit


def unframe(body: bytes) -> tuple[bytes, bytes]:
    """The stream an INSTREAM body carries, and what follows its end."""
    out = bytearray()
    i = 0
    while True:
        (n,) = struct.unpack(">I", body[i : i + 4])
        i += 4
        if n == 0:
            return bytes(out), body[i:]
        out += body[i : i + n]
        i += n


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 35])
def test_frames_carry_the_message_in_length_prefixed_chunks(size: int) -> None:
    message = bytes(range(256))[:size] if size < 256 else b"x" * size
    body = b"".join(bytes(p) for p in frames(message, chunk=10))
    stream, rest = unframe(body)
    assert (stream, rest) == (message, b"")
    assert body.endswith(END)
    chunks = (size + 9) // 10
    assert len(body) == size + 4 * chunks + 4  # a length per chunk, and the end


@pytest.mark.parametrize(
    ("raw", "number", "reply"),
    [
        (b"stream: OK\0", None, Reply("clean", "")),
        (b"3: stream: OK\0", 3, Reply("clean", "")),
        (b"stream: Eicar-Test-Signature FOUND\0", None, Reply("found", "Eicar-Test-Signature")),
        (b"12: stream: Win.Trojan.X-1 FOUND\0", 12, Reply("found", "Win.Trojan.X-1")),
        (
            b"1: INSTREAM size limit exceeded. ERROR\0",
            1,
            Reply("size_limit", "INSTREAM size limit exceeded. ERROR"),
        ),
        (
            b"1: stream: Can't allocate memory ERROR\0",
            1,
            Reply("error", "stream: Can't allocate memory ERROR"),
        ),
        # What clamd names is shown as printable ASCII only, and not at any length.
        (b"stream: Bad\x1b[31mName FOUND\0", None, Reply("found", "Bad?[31mName")),
        (b"stream: " + b"N" * 500 + b" FOUND\0", None, Reply("found", "N" * 200)),
    ],
)
def test_replies_are_read(raw: bytes, number: int | None, reply: Reply) -> None:
    assert parse_reply(raw, number) == reply


@pytest.mark.parametrize(
    ("raw", "number"),
    [
        (b"2: stream: OK\0", 1),  # another command's answer: out of step
        (b"stream: OK\0", 1),  # not numbered inside a session
        (b"PONG\0", None),
        (b"stream:  FOUND\0", None),  # no name
        (b"UNKNOWN COMMAND\0", None),
    ],
)
def test_anything_else_is_a_protocol_error(raw: bytes, number: int | None) -> None:
    with pytest.raises(ScannerProtocolError):
        parse_reply(raw, number)


# -- a fake clamd -------------------------------------------------------------------------


class FakeClamd:
    """Speaks clamd's side of IDSESSION + INSTREAM on fake connections: finds
    `virus` in a stream, refuses streams over `stream_max` as clamd does (an
    answer, then the connection closed), or answers with `override`."""

    def __init__(self, stream_max: int = 1 << 20) -> None:
        self.stream_max = stream_max
        self.streams: list[bytes] = []
        self.commands: list[bytes] = []
        self.override: bytes | None = None
        self.silent = False
        self.limit_answered = True  # False: past stream_max, close without a word

    def answer(self, peer: FakePeer, data: bytes) -> None:
        peer.received += data
        buf = peer.received
        while True:
            state = getattr(peer, "state", None)
            if state is None:
                if not buf.startswith(b"z") or b"\0" not in buf:
                    return
                cmd, _, _ = bytes(buf).partition(b"\0")
                del buf[: len(cmd) + 1]
                self.commands.append(cmd)
                if cmd == b"zIDSESSION":
                    peer.session = True  # type: ignore[attr-defined]
                    peer.n = 0  # type: ignore[attr-defined]
                    continue
                assert cmd == b"zINSTREAM"
                peer.n = getattr(peer, "n", 0) + 1  # type: ignore[attr-defined]
                peer.state = bytearray()  # type: ignore[attr-defined]
                continue
            if len(buf) < 4:
                return
            (n,) = struct.unpack(">I", buf[:4])
            if n and len(state) + n > self.stream_max:
                if self.limit_answered:
                    self._send(peer, b"INSTREAM size limit exceeded. ERROR")
                peer.hang_up()
                return
            if len(buf) < 4 + n:
                return
            state += buf[4 : 4 + n]
            del buf[: 4 + n]
            if n == 0:
                self.streams.append(bytes(state))
                peer.state = None  # type: ignore[attr-defined]
                if self.silent:
                    return
                if self.override is not None:
                    self._send(peer, self.override)
                elif b"virus" in state:
                    self._send(peer, b"stream: Test.Virus FOUND")
                else:
                    self._send(peer, b"stream: OK")
                if not getattr(peer, "session", False):
                    peer.hang_up()

    @staticmethod
    def _send(peer: FakePeer, reply: bytes) -> None:
        prefix = b"%d: " % peer.n if getattr(peer, "session", False) else b""  # type: ignore[attr-defined]
        peer.reply(prefix + reply + b"\0")


class FakeClamavCheck(ClamavCheck):
    pool_type = FakePool


def clamav(fake: FakeClamd, **opts: object) -> ClamavCheck:
    check = FakeClamavCheck().configured(ClamavOptions(enabled=True, **opts))  # type: ignore[arg-type]
    assert isinstance(check.pool, FakePool)
    check.pool.answer = fake.answer
    return check


def scan(check: ClamavCheck, message: bytes) -> tuple[tuple[str, ...], Context]:
    async def go() -> tuple[tuple[str, ...], Context]:
        c = Context("s", "192.0.2.7", 4000, "smtp")
        c.unstuffed(message)
        c.deadline = asyncio.get_running_loop().time() + 30
        out = check.run(Stage.DATA, c)
        return tuple(out if isinstance(out, tuple) else await out), c

    return asyncio.run(go())


def scans(check: ClamavCheck, messages: list[bytes]) -> list[tuple[tuple[str, ...], Context]]:
    async def go() -> list[tuple[tuple[str, ...], Context]]:
        out = []
        for m in messages:
            c = Context("s", "192.0.2.7", 4000, "smtp")
            c.unstuffed(m)
            c.deadline = asyncio.get_running_loop().time() + 30
            r = check.run(Stage.DATA, c)
            out.append((tuple(r if isinstance(r, tuple) else await r), c))
        return out

    return asyncio.run(go())


def test_a_virus_is_virus_found_with_its_name_in_the_facts_only() -> None:
    fake = FakeClamd()
    (symbols, c), (clean, c2) = scans(clamav(fake), [b"a virus here", b"nothing"])
    assert symbols == ("virus.found",) and clean == ()
    f = c.facts.scans[0]
    assert (f.scanner, f.verdict, f.detail) == ("clamav", "infected", "Test.Virus")
    assert c2.facts.scans[0].verdict == "clean"
    assert fake.streams == [b"a virus here", b"nothing"]


def test_one_session_carries_the_scans_numbered() -> None:
    """IDSESSION: the first scan opens the session, the next ones reuse the
    connection, each reply numbered by its command."""
    fake = FakeClamd()
    check = clamav(fake)
    results = scans(check, [b"one", b"two virus", b"three"])
    assert [r[0] for r in results] == [(), ("virus.found",), ()]
    assert fake.commands == [b"zIDSESSION", b"zINSTREAM", b"zINSTREAM", b"zINSTREAM"]
    assert isinstance(check.pool, FakePool) and check.pool.opened == 1


def test_big_message_is_sent_in_chunks_whole() -> None:
    fake = FakeClamd()
    message = bytes(range(256)) * 1000  # 256 000 bytes: four chunks
    assert scan(clamav(fake), message)[0] == ()
    assert fake.streams == [message]


def test_clamd_size_limit_is_unavailable_not_too_big_and_the_connection_is_not_kept() -> None:
    """max_size above clamd's StreamMaxLength: clamd answers mid-stream and
    closes; the answer is read although sending failed. The message was within
    max_size and went unscanned for clamd's configuration: the scanner failed
    (clamav.unavailable, fail closed by default), not the policy's too_big, which
    the default accepts: that would deliver it unscanned."""
    fake = FakeClamd(stream_max=100_000)
    check = clamav(fake)
    symbols, c = scan(check, b"x" * 300_000)
    assert symbols == ("clamav.unavailable",)
    assert c.facts.scans[0].verdict == "unavailable"
    assert "StreamMaxLength" in c.facts.scans[0].detail
    assert isinstance(check.pool, FakePool) and check.pool.idle == []


def test_clamd_closing_mid_message_without_an_answer_is_unavailable_and_says_why() -> None:
    fake = FakeClamd(stream_max=100_000)
    fake.limit_answered = False
    symbols, c = scan(clamav(fake), b"x" * 300_000)
    assert symbols == ("clamav.unavailable",)
    assert "StreamMaxLength" in c.facts.scans[0].detail


def test_max_size_keeps_a_large_message_from_clamd() -> None:
    fake = FakeClamd()
    symbols, _ = scan(clamav(fake, max_size=1000), b"virus" * 1000)
    assert symbols == ("clamav.too_big",) and fake.streams == [] and fake.commands == []


@pytest.mark.parametrize(
    ("override", "detail"),
    [
        (b"stream: Can't allocate memory ERROR", "clamd: stream: Can't allocate memory ERROR"),
        (b"HELLO", "unexpected clamd reply: HELLO"),
    ],
)
def test_an_error_or_nonsense_is_unavailable(override: bytes, detail: str) -> None:
    fake = FakeClamd()
    fake.override = override
    check = clamav(fake)
    symbols, c = scan(check, b"hi")
    assert symbols == ("clamav.unavailable",)
    assert c.facts.scans[0].detail == detail
    assert isinstance(check.pool, FakePool) and check.pool.idle == []


def test_a_silent_clamd_is_a_timeout_at_the_deadline() -> None:
    fake = FakeClamd()
    fake.silent = True
    check = clamav(fake)

    async def go() -> tuple[str, ...]:
        c = Context("s", "192.0.2.7", 4000, "smtp")
        c.unstuffed(b"hi")
        c.deadline = asyncio.get_running_loop().time()  # passed: the first wait ends it
        out = check.run(Stage.DATA, c)
        assert not isinstance(out, tuple)
        return tuple(await out)

    assert asyncio.run(go()) == ("clamav.timeout",)


def test_the_virus_reply_names_no_signature() -> None:
    from gateway import replies
    from gateway.vocab import Action

    r = replies.for_action(Action.REJECT, "virus.found")
    assert (r.code, r.enhanced) == (554, "5.7.0")
    assert "virus" in r.text.lower() and "{" not in r.text
    tf: Callable[[str], replies.Reply] = lambda s: replies.for_action(Action.TEMPFAIL, s)  # noqa: E731
    assert tf("clamav.unavailable").code == 451 and tf("clamav.timeout").code == 451


def test_an_error_answer_on_a_kept_connection_is_not_sent_again() -> None:
    """clamd answered that it will not scan (an ERROR reply): the message is not sent
    a second time over a new connection to hear the same answer, and the other kept
    connections are not dropped as if clamd had restarted."""
    fake = FakeClamd()
    check = clamav(fake)
    assert [r for r, _ in scans(check, [b"one\r\n", b"two\r\n"])] == [(), ()]
    fake.override = b"Can't allocate memory ERROR"
    [(third, c)] = scans(check, [b"three\r\n"])
    assert third == ("clamav.unavailable",)
    assert "Can't allocate memory" in c.facts.scans[0].detail
    assert len(fake.streams) == 3  # two messages before, this one once
    assert isinstance(check.pool, FakePool) and len(check.pool.peers) == 1
