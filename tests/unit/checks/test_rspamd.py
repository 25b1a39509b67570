"""The Rspamd check and the header changes it leads to, without sockets: a fake
connection fed the bytes Rspamd would send, and headers.compose on messages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import ValidationError

from gateway import headers
from gateway.address import Address
from gateway.checks.rspamd import RspamdCheck, RspamdOptions, envelope
from gateway.checks.scanner import (
    Connection,
    ConnectionPool,
    ScannerProtocolError,
    ScannerUnavailable,
    parse_endpoint,
)
from gateway.context import Context
from gateway.facts import HeaderEdits, RspamdFacts
from gateway.wire import stuff

pytestmark = pytest.mark.unit


class FakeWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def connection(answer: bytes, *, eof: bool = True) -> tuple[Connection, FakeWriter]:
    """A connection whose peer sent `answer` (call it with a loop running)."""
    reader = asyncio.StreamReader()
    reader.feed_data(answer)
    if eof:
        reader.feed_eof()
    writer = FakeWriter()
    return Connection(reader, writer), writer  # type: ignore[arg-type]


def http(body: dict[str, Any] | bytes, *fields: str, status: str = "200 OK") -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [f"HTTP/1.1 {status}", *fields, f"Content-Length: {len(raw)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


def verdict(action: str, **over: Any) -> dict[str, Any]:
    return {"action": action, "score": 7.0, "required_score": 15.0, **over}


def context() -> Context:
    return Context(
        "77b59b000001",
        "::ffff:192.0.2.1",
        40000,
        "smtp",
        helo="mx.sender.test",
        mail_from=Address("alice", "sender.test"),
        recipients=[Address("bob", "example.test"), Address("jo", "bücher.test")],
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
    )


def check(**opts: Any) -> RspamdCheck:
    return RspamdCheck().configured(RspamdOptions(enabled=True, **opts))


def scan(answer: bytes, ctx: Context | None = None, **opts: Any) -> tuple[Any, Context, Any]:
    ctx = ctx or context()

    async def go() -> tuple[Any, FakeWriter]:
        conn, writer = connection(answer)
        return await check(**opts).scan(ctx, b"Subject: s\r\n\r\nhi\r\n", conn), writer

    result, writer = asyncio.run(go())
    return result, ctx, writer


@pytest.mark.parametrize(
    ("action", "symbols", "word"),
    [
        ("reject", ("rspamd.reject",), "reject"),
        ("soft reject", ("rspamd.soft_reject",), "soft_reject"),
        ("rewrite subject", ("rspamd.rewrite_subject",), "rewrite_subject"),
        ("add header", ("rspamd.add_header",), "add_header"),
        ("greylist", ("rspamd.greylist",), "greylist"),
        ("no action", (), "clean"),
        ("discard", ("rspamd.custom_action",), "discard"),
    ],
)
def test_each_action_becomes_its_symbol(action: str, symbols: tuple[str, ...], word: str) -> None:
    result, ctx, _ = scan(http(verdict(action)))
    assert result.symbols == symbols
    assert result.verdict == word
    assert set(symbols) <= RspamdCheck.symbols
    assert ctx.facts.rspamd is not None and ctx.facts.rspamd.action == action
    assert result.detail.startswith(f"{action}, score 7.00/15.00")


def test_skipped_by_rspamd_settings_is_no_symbol() -> None:
    result, _, _ = scan(http(verdict("reject", is_skipped=True)))
    assert (result.symbols, result.verdict) == ((), "skipped")


def test_request_carries_the_context_and_the_message() -> None:
    _, _, writer = scan(http(verdict("no action")))
    head, _, body = bytes(writer.data).partition(b"\r\n\r\n")
    assert body == b"Subject: s\r\n\r\nhi\r\n"
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /checkv2 HTTP/1.1"
    assert b"Host: 127.0.0.1:11333" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert b"IP: 192.0.2.1" in lines  # the IPv4 client a dual-stack listener saw mapped
    assert b"Helo: mx.sender.test" in lines
    assert b"From: <alice@sender.test>" in lines
    # A UTF-8 domain as its A-labels: Rspamd's address parser takes ASCII.
    assert [x for x in lines if x.startswith(b"Rcpt:")] == [
        b"Rcpt: <bob@example.test>",
        b"Rcpt: <jo@xn--bcher-kva.test>",
    ]
    assert b"Queue-Id: 77b59b000001" in lines
    assert b"TLS-Version: TLSv1.3" in lines
    assert b"TLS-Cipher: TLS_AES_256_GCM_SHA384" in lines


def test_envelope_of_a_bounce_without_helo() -> None:
    ctx = Context("s", "2001:db8::1", 1, "smtp", mail_from=Address("", ""))
    env = envelope(ctx)
    assert (env.mail_from, env.helo, env.client_ip, env.recipients) == ("", None, "2001:db8::1", ())


def test_connection_kept_only_when_the_server_keeps_it() -> None:
    """Rspamd's own worker says Connection: close: the connection is closed, and the
    pool does not keep it; a server that keeps connections gets ours back."""
    pool = ConnectionPool(parse_endpoint("http://127.0.0.1:11333"), 4, "rspamd")
    _, _, closed = scan(http(verdict("no action"), "Connection: close"))
    assert closed.closed

    async def go() -> tuple[Connection, FakeWriter]:
        conn, writer = connection(http(verdict("no action")), eof=False)
        await check().scan(context(), b"m", conn)
        return conn, writer

    conn, writer = asyncio.run(go())
    assert not writer.closed
    pool.release(conn)
    assert pool.idle == [conn]


def test_chunked_keep_alive_reply_fed_in_pieces() -> None:
    body = json.dumps(verdict("add header")).encode()
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )
    writer = FakeWriter()

    async def go() -> Any:
        reader = asyncio.StreamReader()
        conn = Connection(reader, writer)  # type: ignore[arg-type]
        task = asyncio.ensure_future(check().scan(context(), b"m", conn))
        for i in range(0, len(answer), 5):
            reader.feed_data(answer[i : i + 5])
            await asyncio.sleep(0)
        return await task

    assert asyncio.run(go()).symbols == ("rspamd.add_header",)
    assert not writer.closed


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (b"", ScannerUnavailable, "connection closed by rspamd"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{", ScannerProtocolError, "closed before"),
        (
            http(b'{"error":"x"}', status="500 Internal Server Error"),
            ScannerProtocolError,
            "HTTP 500",
        ),
        (http(b"<html>"), ScannerProtocolError, "not JSON"),
        (b"PONG\r\n\r\n", ScannerProtocolError, "not an HTTP status line"),
        (http(verdict("reject", score=None)), ScannerProtocolError, "score"),
    ],
)
def test_failures_map_to_the_scanner_errors(
    answer: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        scan(answer)


def test_a_large_reply_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over THREAD_REPLY the JSON is parsed in a thread (the URL list of a large
    message): the verdict is the same."""
    threaded: list[int] = []
    real = asyncio.to_thread

    async def spy(fn: Any, *args: Any) -> Any:
        threaded.append(len(args[0]))
        return await real(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    urls = [f"h{i}.example.com" for i in range(30_000)]
    result, _, _ = scan(http(verdict("add header", urls=urls)))
    assert result.symbols == ("rspamd.add_header",)
    assert threaded and threaded[0] > 256 * 1024


MILTER = {
    "add_headers": {
        "X-Spamd-Result": "default: True",
        "X-Other": "x",
        "Authentication-Results": "rspamd.test; spf=pass",
    },
    "remove_headers": {"X-Spam": 0, "Received": 0},
}


def test_milter_changes_kept_only_for_allowed_names() -> None:
    _, ctx, _ = scan(http(verdict("add header", milter=MILTER)))
    assert ctx.facts.rspamd is not None
    assert ctx.facts.rspamd.edits == HeaderEdits(
        add=(
            ("X-Spamd-Result", "default: True"),
            ("Authentication-Results", "rspamd.test; spf=pass"),
        ),
        remove=(("X-Spam", 0),),
    )
    _, ctx, _ = scan(http(verdict("add header", milter=MILTER)), milter_header_names=["x-oth*"])
    assert ctx.facts.rspamd is not None
    assert ctx.facts.rspamd.edits == HeaderEdits(add=(("X-Other", "x"),))
    _, ctx, _ = scan(http(verdict("add header", milter=MILTER)), apply_milter_headers=False)
    assert ctx.facts.rspamd is not None and ctx.facts.rspamd.edits == HeaderEdits()


def test_subject_only_for_rewrite_subject_and_when_allowed() -> None:
    for action, opts, expect in [
        ("rewrite subject", {}, "[SPAM] hi"),
        ("rewrite subject", {"rewrite_subject": False}, None),
        ("add header", {}, None),
    ]:
        _, ctx, _ = scan(http(verdict(action, subject="[SPAM] hi")), **opts)
        assert ctx.facts.rspamd is not None
        assert ctx.facts.rspamd.edits.subject == expect, (action, opts)


def test_options_validate_endpoint_and_patterns() -> None:
    assert RspamdOptions().endpoint == "http://127.0.0.1:11333"
    RspamdOptions(endpoint="unix:/run/rspamd/normal.sock")
    with pytest.raises(ValidationError, match="http://HOST:PORT"):
        RspamdOptions(endpoint="tcp://127.0.0.1:11333")
    with pytest.raises(ValidationError, match="a field name, or a pattern"):
        RspamdOptions(milter_header_names=["X-Spam: *"])
    with pytest.raises(ValidationError, match="a field name, or a pattern"):
        RspamdOptions(milter_header_names=[""])


# -- the header changes, as headers.compose applies them ------------------------------

OURS = headers.our_fields(
    "gw.test", "gw.test", ("X-Gateway-Tag", "X-Gateway-Quarantine", *headers.SPAM_FIELDS)
)


def compose(wire: bytes, facts: RspamdFacts) -> tuple[bytes, bytes]:
    verdicts = headers.Verdicts("gw.test", [], "X-Gateway-Tag", [], None, facts)
    out, prefix, _ = headers.compose(wire, b"Received: x\r\n", OURS, verdicts)
    return out, prefix


def test_our_spam_fields_in_front_with_the_strongest_symbols() -> None:
    facts = RspamdFacts("add header", 25.0, 50.0, (("GW_TAG", 25.0), ("HAM", -1.5)))
    _, prefix = compose(b"Subject: s\r\n\r\nhi\r\n", facts)
    assert prefix.endswith(
        b"X-Spam-Status: Yes, score=25.00 required=50.00 tests=GW_TAG(25.00),HAM(-1.50)\r\n"
        b"X-Spam-Score: 25.00\r\nX-Spam-Action: add header\r\n"
    )
    _, prefix = compose(b"\r\nhi\r\n", RspamdFacts("greylist", 5.0, 50.0))
    assert b"X-Spam-Status: No, score=5.00 required=50.00\r\n" in prefix
    _, prefix = compose(b"\r\nhi\r\n", RspamdFacts("reject", 5.0, 50.0, spam_headers=False))
    assert b"X-Spam" not in prefix


def test_fields_rspamd_adds_never_speak_in_our_name() -> None:
    edits = HeaderEdits(
        add=(
            ("Authentication-Results", "gw.test; dmarc=pass header.from=forged.test"),
            ("Authentication-Results", "GW.TEST.; spf=pass"),
            ("Authentication-Results", "=?utf-8?q?gw.test?=; dkim=pass"),
            ("Authentication-Results", "rspamd.test; spf=pass"),
            ("X-Gateway-Tag", "nothing"),
            ("X-Spam-Status", "No, score=-100"),
            ("X-Spamd-Result", "default: True"),
            ("Bad Name", "x"),
            ("X-Smuggle", "ok\r\nBcc: x@y.test"),  # not what field_value makes: refused
        )
    )
    _, prefix = compose(b"\r\nhi\r\n", RspamdFacts("add header", 1.0, 50.0, edits=edits))
    added = prefix.split(b"X-Spam-Action: add header\r\n", 1)[1]
    assert added == (
        b"Authentication-Results: rspamd.test; spf=pass\r\nX-Spamd-Result: default: True\r\n"
    )


def test_removals_by_position_and_the_body_untouched() -> None:
    wire = stuff(
        b"X-A: 1\r\nx-a: 2\r\nX-A: 3\r\nX-B: 1\r\n\tfolded\r\nX-B: 2\r\nX-C: 1\r\nSubject: s\r\n"
        b"\r\n.X-A: not a field\r\nX-A: body\r\n"
    )
    edits = HeaderEdits(remove=(("x-A", 2), ("X-B", -2), ("X-C", 0), ("X-Missing", 0), ("X-A", 9)))
    out, _ = compose(wire, RspamdFacts("no action", 0.0, 50.0, edits=edits))
    assert out == stuff(
        b"X-A: 1\r\nX-A: 3\r\nX-B: 2\r\nSubject: s\r\n\r\n.X-A: not a field\r\nX-A: body\r\n"
    )


def test_subject_replaced_in_place_others_removed_or_added() -> None:
    edits = HeaderEdits(subject="[SPAM] s\r\n\tmore")
    out, _ = compose(
        b"From: a@b.test\r\nSubject: s\r\nTo: c@d.test\r\nsubject: again\r\n\r\nhi\r\n",
        RspamdFacts("rewrite subject", 35.0, 50.0, edits=edits),
    )
    assert out == b"From: a@b.test\r\nSubject: [SPAM] s\r\n\tmore\r\nTo: c@d.test\r\n\r\nhi\r\n"
    out, _ = compose(b"From: a@b.test\r\n\r\nhi\r\n", RspamdFacts("x", 1, 2, edits=edits))
    assert out == b"From: a@b.test\r\nSubject: [SPAM] s\r\n\tmore\r\n\r\nhi\r\n"
    bad = HeaderEdits(subject="x\r\nBcc: y@z.test")
    out, _ = compose(b"Subject: s\r\n\r\nhi\r\n", RspamdFacts("x", 1, 2, edits=bad))
    assert out == b"Subject: s\r\n\r\nhi\r\n"


def test_no_edits_return_the_message_as_it_was() -> None:
    wire = b"Subject: s\r\n\r\nhi\r\n"
    out, _ = compose(wire, RspamdFacts("no action", 0.0, 50.0))
    assert out is wire
    # Removals of fields the message does not have (the usual case): not rebuilt.
    absent = HeaderEdits(remove=(("X-Spam", 0), ("X-Spamd-Result", 0)))
    out, _ = compose(wire, RspamdFacts("no action", 0.0, 50.0, edits=absent))
    assert out is wire
