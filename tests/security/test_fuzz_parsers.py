"""Fuzzing the parsers that read hostile input (hypothesis, bounded in time): address
paths, header address lists, Authentication-Results removal, PROXY headers, bare
CR/LF detection, the From domain DMARC judges. Each property either holds or is a
finding."""

from __future__ import annotations

import asyncio
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.address import Address, AddressError, parse_path, split_path
from gateway.checks.dmarc import from_domains
from gateway.headers import _authserv_id, our_fields, strip_forged
from gateway.rewrite.header import addr_spans, rewrite_value
from gateway.smtp.proxy import ProxyError, read_header
from gateway.stream import Stream, StreamClosed
from gateway.wire import has_bare_cr_lf, normalise, stuff, unstuff, unstuff_pieces

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces that make the parsers take their rarer paths.
PIECES = ["<", ">", "@", '"', "\\", ":", ",", ";", "(", ")", "[", "]", ".", "%", "!", " ",
          "\t", "\r\n", "=?utf-8?q?x?=", "user", "example.test", "IPv6:", "127.0.0.1",
          "SRS0=", "é", "\x00", "\x7f"]  # fmt: skip
text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(PIECES), max_size=25).map("".join),
)


@FUZZ
@given(text)
def test_parse_path_accepts_only_what_it_can_print_back(s: str) -> None:
    try:
        addr = parse_path(s, allow_null=True)
    except AddressError:
        return
    out = str(addr)
    assert not re.search(r"[\x00-\x1f\x7f]", out), out
    if addr.is_null or addr.route or addr.literal:
        return
    again = parse_path(f"<{out}>")
    assert (again.local, again.domain) == (addr.local, addr.domain)


@FUZZ
@given(text)
def test_split_path_never_loses_bytes(s: str) -> None:
    try:
        path, rest = split_path(s)
    except AddressError:
        return
    assert path + rest == s and path.startswith("<") and path.endswith(">")


def _swap_domain(a: Address) -> Address | None:
    return Address(a.local, "rewritten.test") if a.domain != "rewritten.test" else None


@FUZZ
@given(text)
def test_header_rewrite_changes_only_address_spans(value: str) -> None:
    spans = addr_spans(value)
    new = rewrite_value(value, _swap_domain)
    if new is None:
        return
    assert spans, "a rewrite without spans"
    assert new.count("\r") == value.count("\r") and new.count("\n") == value.count("\n")
    # Outside the spans, every character is where it was.
    last, kept = 0, []
    for a, b in spans:
        kept.append(value[last:a])
        last = b
    kept.append(value[last:])
    pos = 0
    for piece in kept:
        idx = new.find(piece, pos)
        assert idx >= 0, (value, new)
        pos = idx + len(piece)


header_line = st.one_of(
    st.sampled_from([
        b"Authentication-Results: gw.test; spf=pass",
        b"authentication-results:\r\n gw.test;\r\n dkim=pass",
        b'AUTHENTICATION-RESULTS: "GW.TEST"; x=y',
        b"Authentication-Results: =?utf-8?q?gw.test?=; spf=pass",
        b"Authentication-Results: other.test; spf=pass",
        b"Authentication-Results: ((((a)))) gw.test; dkim=pass",
        b"Authentication-Results: (a (b (c (d (e))))) gw.test; dkim=pass",
        b"Authentication-Results: (\\() gw.test; spf=pass",
        b"ARC-Authentication-Results: i=1; gw.test; arc=pass",
        b"X-Gateway-Tag: spf.pass",
        b"Subject: hello",
        b"X-Thing: a\r\n\tb",
    ]),
    st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
    ),
).filter(bool)  # fmt: skip

OURS = our_fields("gw.test", "gw.test", ("X-Gateway-Tag",))


def _fields(head: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        else:
            fields.append(line)
    return fields


@FUZZ
@given(st.lists(header_line, max_size=8), st.binary(max_size=100), st.lists(st.booleans()))
def test_no_header_claiming_our_name_survives(
    lines: list[bytes], body: bytes, dots: list[bool]
) -> None:
    """Written as the client sends it: dot-stuffed, some lines with a leading dot of
    their own (which the backend removes), names in any case, comments nested to
    any depth. Judged as the backend will store it: unstuffed."""
    # The wire as a client may write it: any line may carry one leading dot, which the
    # backend removes (a line that is only a dot would have ended the message).
    lines = [b"." + x if i < len(dots) and dots[i] else x for i, x in enumerate(lines)]
    lines = [x for x in lines if x != b"."]
    wire = b"".join(x + b"\r\n" for x in lines) + b"\r\n" + stuff(body.replace(b"\r", b""))
    out, removed = strip_forged(wire, OURS)
    tail = stuff(body.replace(b"\r", b""))
    assert out.endswith(b"\r\n" + tail)  # the body, untouched
    stored = unstuff(out)
    head = b"" if stored.startswith(b"\r\n") else stored.split(b"\r\n\r\n", 1)[0]
    for f in _fields(head):
        name, colon, value = f.partition(b":")
        name = name.strip().lower()
        if colon and name == b"authentication-results":
            assert _authserv_id(value.decode("utf-8", "replace")) != "gw.test", f
        assert not (colon and name == b"x-gateway-tag"), f
    assert removed <= len(lines)


FROM_PIECES = ["a", "@", "bücher.test", "Ü", "<", ">", ",", " ", '"', "=?utf-8?b?w7w=?=",
               ".", "xn--", "ß", "\u200b", "..", "(", ")", ";", ":", "\\", "\r\n "]  # fmt: skip


@FUZZ
@given(st.lists(st.sampled_from(FROM_PIECES), max_size=14), st.binary(max_size=6), st.booleans())
def test_from_domains_are_ascii_names_or_nothing(parts: list[str], junk: bytes, two: bool) -> None:
    """UTF-8 and broken octets in From: never an exception (a From mixing both once
    crashed the DMARC check), and every domain returned is ASCII, as the DNS holds it
    (a U-label as its A-label); one that cannot be, makes the message malformed."""
    value = "".join(parts).encode() + junk
    message = b"From: " + value + b"\r\n" + (b"From: b@x.test\r\n" if two else b"")
    domains = from_domains(message + b"Subject: s\r\n\r\nbody\r\n")
    assert domains is None or all(isinstance(d, str) and d.isascii() for d in domains)


@FUZZ
@given(st.binary(max_size=300))
def test_bare_cr_lf_detection_matches_its_definition(data: bytes) -> None:
    expected = re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None
    assert has_bare_cr_lf(data) == expected
    # Past 64 KiB the detection counts instead: the same answer, wherever the bytes are.
    pad = b"x\r\n" * 22_000
    assert has_bare_cr_lf(pad + data) == expected
    assert has_bare_cr_lf(data + pad) == (
        re.search(rb"\r(?!\n)|(?<!\r)\n", data + b"x") is not None
    )


@FUZZ
@given(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")))
def test_stuffing_round_trips(content: bytes) -> None:
    # The wire form always ends with CRLF: content without one gets it.
    expected = content if not content or content.endswith(b"\r\n") else content + b"\r\n"
    assert unstuff(stuff(content)) == expected


proxy_input = st.one_of(
    st.binary(max_size=120),
    st.lists(st.sampled_from([b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"192.0.2.1 ",
                              b"::1 ", b"65535 ", b"99999 ", b"\r\n", b"\x0d\x0a\x0d\x0a\x00"
                              b"\x0d\x0aQUIT\x0a", b"\x21\x11\x00\x0c", b"\x00" * 12]),
             max_size=10).map(b"".join),
)  # fmt: skip


class _Feed:
    """A transport stand-in: the fuzzed bytes arrive, then the connection ends."""

    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


@FUZZ
@given(proxy_input)
def test_proxy_header_parser_refuses_cleanly(data: bytes) -> None:
    async def run() -> None:
        s = Stream()
        s.connection_made(_Feed())  # type: ignore[arg-type]
        s.data_received(data)
        s.eof_received()
        try:
            info = await asyncio.wait_for(read_header(s), 5)
        except (ProxyError, StreamClosed):
            return
        if info.src_addr is not None:
            assert re.fullmatch(r"[0-9a-fA-F:.]+", info.src_addr)
            assert info.src_port is None or 0 <= info.src_port <= 65535

    asyncio.run(run())


_LINE_BYTES = st.binary(max_size=60).map(lambda b: bytes(b"\r\n.ab"[x % 5] for x in b))


@FUZZ
@given(_LINE_BYTES, st.integers(min_value=1, max_value=8))
def test_normalising_in_pieces_is_normalising_at_once(data: bytes, size: int) -> None:
    """Line ends made CRLF a piece at a time (pieces of `size` bytes and more, each
    ending after an LF) give what one pass over the whole message gives."""
    content = unstuff(data).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    assert normalise(data, size) == stuff(content.replace(b"\n", b"\r\n"))


@FUZZ
@given(_LINE_BYTES, st.integers(min_value=1, max_value=8))
def test_unstuffing_in_pieces_is_unstuffing_at_once(data: bytes, size: int) -> None:
    clean = data.replace(b"\r", b"").replace(b"\n", b"\r\n")  # what check_wire lets by
    assert unstuff_pieces(clean, size) == unstuff(clean)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(_LINE_BYTES, st.integers(min_value=0, max_value=3))
def test_bare_cr_lf_detection_is_the_same_across_piece_cuts(data: bytes, shift: int) -> None:
    """Past 64 KiB the detection counts a piece at a time: a pair cut in two by a
    piece's end is still one pair."""
    from gateway.wire import PIECE

    head = b"y\r\n" * 30_000
    pad = b"x" * (PIECE - len(head) - shift)  # `data` begins `shift` bytes before the cut
    whole = head + pad + data
    expected = re.search(rb"\r(?!\n)|(?<!\r)\n", whole) is not None
    assert has_bare_cr_lf(whole) == expected
