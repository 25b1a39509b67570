"""Rspamd's HTTP protocol without sockets: the request head, the response framing
and the JSON reply, hostile replies included."""

from __future__ import annotations

import json
import time

import pytest

from gateway.checks import rspamd_protocol as rp
from gateway.checks.rspamd_protocol import (
    Envelope,
    ResponseParser,
    RspamdProtocolError,
    build_request,
    field_value,
    parse_reply,
)

pytestmark = pytest.mark.unit

ENV = Envelope(
    client_ip="192.0.2.1",
    helo="mx.sender.test",
    mail_from="alice@sender.test",
    recipients=("a@example.test", "b@example.test"),
    queue_id="77b59b000001",
)

# A reply of the real rspamd 3.4 (tests/support/rspamd.py, marker GWTEST-TAG), as sent.
REAL = (
    b'{"is_skipped":false,"score":25.0,"required_score":50.0,"action":"add header",'
    b'"symbols":{"GW_TAG":{"name":"GW_TAG","score":25.0,"metric_score":25.0,'
    b'"options":["marker"]}},"messages":{},"message-id":"undef","time_real":0.001226,'
    b'"milter":{"add_headers":{"X-Spamd-Result":{"value":"default: False [25.00 / 50.00];'
    b'\\r\\n\\tGW_TAG(25.00)[marker]","order":-1},"X-Spam-Status":{"value":"Yes, '
    b'score=25.00","order":-1}},"remove_headers":{"X-Spam":0,"X-Spamd-Result":0,'
    b'"X-Spam-Status":0}}}'
)


def reply(**over: object) -> bytes:
    base: dict[str, object] = {"score": 1.5, "required_score": 15.0, "action": "no action"}
    base.update(over)
    return json.dumps(base).encode()


# -- the request ----------------------------------------------------------------------


def test_request_carries_the_envelope_one_rcpt_field_per_recipient() -> None:
    assert build_request("127.0.0.1:11333", ENV, 42) == (
        b"POST /checkv2 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:11333\r\n"
        b"Content-Length: 42\r\n"
        b"IP: 192.0.2.1\r\n"
        b"Helo: mx.sender.test\r\n"
        b"From: <alice@sender.test>\r\n"
        b"Rcpt: <a@example.test>\r\n"
        b"Rcpt: <b@example.test>\r\n"
        b"Queue-Id: 77b59b000001\r\n"
        b"\r\n"
    )


def test_request_null_sender_user_and_tls_and_no_helo() -> None:
    env = Envelope(
        "2001:db8::1", None, "", ("a@example.test",), "q1", "bob", "TLSv1.3", "TLS_AES_256"
    )
    head = build_request("localhost", env, 0).split(b"\r\n")
    assert b"From: <>" in head
    assert b"User: bob" in head
    assert b"TLS-Version: TLSv1.3" in head and b"TLS-Cipher: TLS_AES_256" in head
    assert b"IP: 2001:db8::1" in head
    assert not any(line.startswith(b"Helo:") for line in head)


def test_request_values_cannot_add_fields_and_are_bounded() -> None:
    env = Envelope(
        "192.0.2.1",
        "evil.test\r\nRcpt: <victim@example.test>\x00" + "é" * 600,
        "a@b.test\nX: y",
        ("c@example.test",),
        "q",
    )
    head = build_request("h", env, 1)
    lines = head.split(b"\r\n")
    assert [line for line in lines if line.startswith(b"Rcpt:")] == [b"Rcpt: <c@example.test>"]
    helo = next(line for line in lines if line.startswith(b"Helo: "))
    assert helo.startswith(b"Helo: evil.testRcpt: <victim@example.test>")
    assert len(helo) <= len(b"Helo: ") + rp.MAX_REQUEST_VALUE
    helo.decode("utf-8")  # cut at a character boundary
    assert b"From: <a@b.testX: y>" in lines
    assert b"\n" not in head.replace(b"\r\n", b"") and b"\x00" not in head


# -- the response framing ---------------------------------------------------------------


def ok(body: bytes, *fields: str, version: str = "1.1") -> bytes:
    head = [f"HTTP/{version} 200 OK", *fields]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_response_by_content_length_fed_a_byte_at_a_time() -> None:
    raw = ok(REAL, "Connection: close", "Server: rspamd/3.4", f"Content-Length: {len(REAL)}")
    p = ResponseParser()
    got = [p.feed(raw[i : i + 1]) for i in range(len(raw))]
    assert all(r is None for r in got[:-1])
    final = got[-1]
    assert final is not None
    assert (final.status, final.body, final.keep_alive) == (200, REAL, False)


@pytest.mark.parametrize(
    ("version", "connection", "keep"),
    [
        ("1.1", None, True),
        ("1.1", "Connection: close", False),
        ("1.1", "Connection: Keep-Alive, Close", False),
        ("1.0", None, False),
        ("1.0", "Connection: keep-alive", True),
    ],
)
def test_keep_alive_follows_the_http_version_and_connection_field(
    version: str, connection: str | None, keep: bool
) -> None:
    fields = ["Content-Length: 2", *([connection] if connection else [])]
    r = ResponseParser().feed(ok(b"{}", *fields, version=version))
    assert r is not None and r.keep_alive is keep


def test_chunked_response_and_interim_100() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    p = ResponseParser()
    r = None
    for i in range(0, len(raw), 7):
        r = p.feed(raw[i : i + 7]) or r
    assert r is not None and r.body == b"hello world" and r.keep_alive


def test_body_up_to_the_close_then_eof() -> None:
    p = ResponseParser()
    assert p.feed(b'HTTP/1.0 200 OK\r\n\r\n{"a":') is None
    assert p.feed(b"1}") is None
    r = p.eof()
    assert r.body == b'{"a":1}' and not r.keep_alive


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "not an HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra", "data after the response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd", "chunk not followed"),
    ],
)
def test_malformed_responses_are_protocol_errors(raw: bytes, error: str) -> None:
    with pytest.raises(RspamdProtocolError, match=error):
        ResponseParser().feed(raw)


def test_response_bounds_head_fields_and_body() -> None:
    with pytest.raises(RspamdProtocolError, match="head over"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * rp.MAX_HEAD)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(rp.MAX_HEAD_FIELDS + 1))
    with pytest.raises(RspamdProtocolError, match="header fields"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\n" + many + b"\r\n")
    # An announced length over the bound fails before a byte of the body is read.
    with pytest.raises(RspamdProtocolError, match="reply over 100 bytes"):
        ResponseParser(100).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n")
    chunked = ResponseParser(100)
    chunked.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunked.feed(b"40\r\n" + b"a" * 0x40 + b"\r\n")
    with pytest.raises(RspamdProtocolError, match="reply over 100 bytes"):
        chunked.feed(b"40\r\n")
    closing = ResponseParser(100)
    closing.feed(b"HTTP/1.0 200 OK\r\n\r\n" + b"a" * 100)
    with pytest.raises(RspamdProtocolError, match="reply over 100 bytes"):
        closing.feed(b"a")


def test_eof_before_the_response_ends_is_an_error() -> None:
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
    with pytest.raises(RspamdProtocolError, match="closed before the response ended"):
        p.eof()


# -- the JSON reply -------------------------------------------------------------------


def test_real_reply_parsed() -> None:
    r = parse_reply(REAL)
    assert (r.action, r.score, r.required, r.skipped) == ("add header", 25.0, 50.0, False)
    assert r.symbols == (("GW_TAG", 25.0),) and r.symbol_count == 1
    assert r.add_headers == (
        ("X-Spamd-Result", "default: False [25.00 / 50.00];\r\n\tGW_TAG(25.00)[marker]"),
        ("X-Spam-Status", "Yes, score=25.00"),
    )
    assert r.remove_headers == (("X-Spam", 0), ("X-Spamd-Result", 0), ("X-Spam-Status", 0))
    assert r.subject is None and r.dropped == 0


@pytest.mark.parametrize(
    ("raw", "action"),
    [
        ("reject", "reject"),
        ("soft reject", "soft reject"),
        ("add_header", "add header"),
        ("Rewrite Subject", "rewrite subject"),
        ("greylist", "greylist"),
        ("no action", "no action"),
        ("discard", "discard"),
        ("quarantine\r\nX: y", "quarantine??x? y"),
    ],
)
def test_actions_read_in_rspamds_spelling(raw: str, action: str) -> None:
    assert parse_reply(reply(action=raw)).action == action


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "not JSON"),
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'{"error": "cannot parse message\\r\\nX"}', "rspamd error: cannot parse message  X"),
        (reply(action=None), "no action"),
        (reply(action=""), "no action"),
        (reply(score="1.5"), "score is not a finite number"),
        (reply(score=True), "score is not a finite number"),
        (b'{"action": "reject", "score": NaN, "required_score": 1}', "score is not a finite"),
        (b'{"action": "reject", "score": 1e999, "required_score": 1}', "score is not a finite"),
        (b'{"action": "reject", "score": ' + b"9" * 5000 + b"}", "not JSON"),
    ],
)
def test_replies_that_are_not_verdicts_are_protocol_errors(body: bytes, error: str) -> None:
    with pytest.raises(RspamdProtocolError, match=error):
        parse_reply(body)


def test_thousands_of_symbols_keep_the_strongest_quickly() -> None:
    symbols = {f"SYM_{i}": {"name": f"SYM_{i}", "score": (i % 97) / 10} for i in range(50_000)}
    symbols["HAM"] = {"score": -20.0}
    symbols["BAD NAME\r\n"] = {"score": 30.0}
    symbols["NO_SCORE"] = {"name": "NO_SCORE"}
    symbols["INF"] = {"score": "inf"}
    body = reply(symbols=symbols)
    assert len(body) < rp.MAX_REPLY
    start = time.perf_counter()
    r = parse_reply(body)
    took = time.perf_counter() - start
    assert r.symbol_count == 50_004
    assert len(r.symbols) == rp.MAX_SYMBOLS
    assert r.symbols[:3] == (
        ("BAD?NAME??", 30.0),
        ("HAM", -20.0),
        ("SYM_10087", 9.6),
    )  # 9.6, the first name of those
    assert took < 1.0, took


def test_milter_values_in_every_form_refolded_never_a_new_field() -> None:
    r = parse_reply(
        reply(
            milter={
                "add_headers": {
                    "X-Plain": "v",
                    "X-List": ["one", {"value": "two", "order": 0}],
                    "X-Inject": "ok\r\nBcc: victim@example.test",
                    "X-Lf": "a\nb\rc\r\n\r\n\r\nd",
                    "X-Empty-Lines": "\r\n\r\nbody?",
                    "X-Unicode": "Grüße\u2028Bcc: x@y.test\x00\x1b[31m",
                    "X-Long": "w" * 10_000,
                    "Bad Name": "x",
                    "Bad:Name": "x",
                    "": "x",
                    "X-" + "n" * 80: "x",
                    "X-Number": 5,
                    "X-Nested": {"value": {"deeper": 1}},
                },
            }
        )
    )
    added = dict(r.add_headers)
    assert [n for n, _ in r.add_headers if n == "X-List"] == ["X-List", "X-List"]
    assert added["X-Plain"] == "v"
    assert added["X-Inject"] == "ok\r\n\tBcc: victim@example.test"
    assert added["X-Lf"] == "a\r\n\tb\r\n\tc\r\n\td"
    assert added["X-Empty-Lines"] == "body?"
    assert added["X-Unicode"] == "Gr??e\r\n\tBcc: x@y.test??[31m"
    assert added["X-Long"].split("\r\n\t") == ["w" * rp.MAX_LINE]
    assert r.dropped == 6
    for _, value in r.add_headers:
        lines = value.split("\r\n")
        assert all(line.startswith("\t") for line in lines[1:])
        assert all((line.strip() and line.isascii() and line.isprintable()) or "\t" in line
                   for line in lines)  # fmt: skip


def test_milter_counts_and_sizes_are_bounded() -> None:
    r = parse_reply(
        reply(
            milter={
                "add_headers": {f"X-A{i}": ["v" * 100] * 3 for i in range(100)},
                "remove_headers": {f"X-R{i}": 0 for i in range(100)},
            },
            subject="s\n" * 10_000,
        )
    )
    assert len(r.add_headers) == rp.MAX_ADD_HEADERS
    assert len(r.remove_headers) == rp.MAX_REMOVE_HEADERS
    assert r.dropped == 300 - rp.MAX_ADD_HEADERS + 100 - rp.MAX_REMOVE_HEADERS
    assert r.subject is not None and len(r.subject.replace("\r\n\t", "")) <= rp.MAX_VALUE


def test_remove_headers_takes_only_whole_numbers() -> None:
    r = parse_reply(
        reply(
            milter={
                "remove_headers": {
                    "X-All": 0,
                    "X-First": 1,
                    "X-Last": -1,
                    "X-Bool": True,
                    "X-Float": 1.5,
                    "X-Str": "1",
                    "X-Huge": 10**12,
                    "Bad Name": 0,
                }
            }
        )
    )
    assert r.remove_headers == (("X-All", 0), ("X-First", 1), ("X-Last", -1))
    assert r.dropped == 5


def test_subject_and_message_are_sanitised() -> None:
    r = parse_reply(
        reply(
            action="rewrite subject",
            subject="[SPAM] hi\r\nBcc: x@y.test",
            messages={"smtp_message": "Try later\r\n250 OK\x00" + "x" * 500},
        )
    )
    assert r.subject == "[SPAM] hi\r\n\tBcc: x@y.test"
    assert r.message.startswith("Try later  250 OK?")
    assert len(r.message) == rp.MAX_MESSAGE


def test_odd_but_harmless_parts_are_ignored() -> None:
    r = parse_reply(reply(symbols=[1, 2], milter="nope", subject=5, is_skipped="yes"))
    assert (r.symbols, r.symbol_count, r.add_headers, r.subject, r.skipped) == (
        (),
        0,
        (),
        None,
        False,
    )
    assert r.dropped == 2
    assert parse_reply(reply(is_skipped=True)).skipped


def test_field_value_keeps_plain_text_and_limits() -> None:
    assert field_value("  a  ") == "a"
    assert field_value("a\tb") == "a\tb"
    assert field_value("x" * 50, limit=10) == "x" * 10
    assert field_value("aaaa\nbbbb\ncccc", limit=10) == "aaaa\r\n\tbbbb\r\n\tcc"
    assert field_value("\r\n\r\n") == ""
