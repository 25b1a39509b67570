"""One message must never stall the event loop: while a hostile message (or MAIL)
is being processed, a NOOP on another session is answered within 100 ms.

The hostile inputs, each under every size limit: a DKIM signature and an ARC
message signature naming 4,000 header fields in h= over a header section of
20,000 short fields, with max_header_fields raised for it (signed with a key the
attacker publishes; the signature need not verify); 50,000 fields under the
default limit; address fields of thousands of comments, or a From of a quarter
megabyte; a message of the maximum size; a sender whose SPF records hold
thousands of ip4: terms (no DNS lookups, so the 10-lookup limit does not bound
them); a message of megabytes that starts with an empty line (no header fields:
nothing may read its body as them).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.checks.dkimrsa import relaxed_body
from tests.support.dkimkeys import rsa_key
from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient

KEY = rsa_key()
BUDGET = 0.1  # seconds a NOOP may wait, at most


def _spf_zone() -> dict[str, list[tuple[str, object]]]:
    zone: dict[str, list[tuple[str, object]]] = {
        "spf.attacker.test": [
            (
                "TXT",
                "v=spf1 " + " ".join(f"include:i{n}.attacker.test" for n in range(10)) + " -all",
            )
        ]
    }
    for n in range(10):
        terms = " ".join(f"ip4:10.{n}.{i // 250}.{i % 250}" for i in range(4000))
        zone[f"i{n}.attacker.test"] = [("TXT", f"v=spf1 {terms} ?all")]
    # pyspf checks a macro term by a regex over the whole term once per label: 115
    # terms of 250 labels each (every term under 512 characters), and eight records
    # of them included from one; and a tab inside one term, which pyspf does not
    # split on (a bound that split on every white space counted it as many terms).
    macro = " ".join(f"x{i}=%%" + ".a" * 250 for i in range(115))
    zone["macro.attacker.test"] = [("TXT", f"v=spf1 {macro} ?all")]
    includes = " ".join(f"include:m{n}.attacker.test" for n in range(8))
    zone["macros.attacker.test"] = [("TXT", f"v=spf1 {includes} ?all")]
    for n in range(8):
        zone[f"m{n}.attacker.test"] = [("TXT", f"v=spf1 {macro} ?all")]
    tabbed = "x=%%" + (".a" * 249 + ".\t") * 118
    zone["tabs.attacker.test"] = [("TXT", f"v=spf1 {tabbed} ?all")]
    return zone


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(
        {"sel._domainkey.attacker.test": [("TXT", KEY.dns)], **_spf_zone()}  # type: ignore[dict-item]
    )
    yield server
    server.close()


@pytest.fixture
def gw(dns: DnsServer, backend: Backend, gateway_factory: Callable[..., Gateway]) -> Gateway:
    return _gateway(gateway_factory, backend.url, dns)


def _gateway(
    factory: Callable[..., Gateway],
    url: str,
    dns: DnsServer,
    policy: str | None = None,
    **limits: object,
) -> Gateway:
    """An untrusted client's gateway on the module's DNS, with a minute for DATA."""
    cfg = base_config(
        url,
        trusted_networks=[],
        dns={"nameservers": [dns.address], "timeout": 2},
        limits={"data_timeout": 60, **limits},
    )
    return factory(cfg, policy=policy)


@pytest.fixture
def gw_many_fields(
    dns: DnsServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> Gateway:
    """An operator who raised max_header_fields and max_header_lines far past their
    defaults: the work must still be linear in what the message holds."""
    return _gateway(
        gateway_factory, backend.url, dns, max_header_fields=25_000, max_header_lines=50_000
    )


def _worst_noop_while(port: int, work: Callable[[RawClient], object]) -> float:
    return _timed_noops(port, work)[0]


def _timed_noops(port: int, work: Callable[[RawClient], object]) -> tuple[float, float]:
    """Run `work` on one session while other sessions send NOOPs: the slowest wait
    for a reply (a NOOP's, or a new session's greeting), and how long `work` took.
    A probe session sends at most 90 NOOPs (100 in a row are free:
    limits.max_junk_commands), then the next one is opened."""
    with RawClient(port, timeout=60) as hostile:
        assert hostile.reply()[0] == 220
        hostile.cmd("EHLO attacker.test")
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                work(hostile)
            except BaseException as e:  # the assertion below shows it
                failure.append(e)
            finally:
                done.set()

        t = threading.Thread(target=run)
        began = time.perf_counter()
        t.start()
        worst = 0.0
        while True:  # at least one probe session, and on until the work is answered
            start = time.perf_counter()
            with RawClient(port, timeout=60) as probe:
                assert probe.reply()[0] == 220
                worst = max(worst, time.perf_counter() - start)
                for _ in range(90):
                    start = time.perf_counter()
                    assert probe.cmd("NOOP")[0] == 250
                    worst = max(worst, time.perf_counter() - start)
                    if done.is_set():
                        break
            if done.is_set():
                break
        t.join(60)
        took = time.perf_counter() - began
        assert not failure, failure
        print(f"worst wait {worst * 1000:.1f} ms, work {took:.2f} s")  # pytest -s: the record
        return worst, took


def _send_data(c: RawClient, sender: str, data: bytes) -> int:
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(data + b".\r\n")
    return c.reply()[0]


def _judged(port: int, sender: str, message: bytes) -> list[int]:
    """The reply codes to `message`, sent while another session's NOOPs are timed:
    none of them may have waited over BUDGET."""
    codes: list[int] = []
    worst = _worst_noop_while(port, lambda c: codes.append(_send_data(c, sender, message)))
    assert worst < BUDGET, f"a NOOP waited {worst * 1000:.0f} ms"
    return codes


def _many_fields(signature: bytes) -> bytes:
    body = b"hello\r\n"
    head = b"a:b\r\n" * 20000 + b"From: x@attacker.test\r\nSubject: s\r\n"
    bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
    return signature.replace(b"BH", bh) + head + b"\r\n" + body


# Distinct names no field has: a search for each from the bottom to the top of
# 20,000 fields. Folded into lines of 100 names, under the 998 octets a backend takes.
_NAMES = [b"m%d" % n for n in range(4000)] + [b"from"]
H_NAMES = b":\r\n ".join(b":".join(_NAMES[i : i + 100]) for i in range(0, len(_NAMES), 100))


def test_dkim_h_of_4000_names_over_20000_fields(gw_many_fields: Gateway) -> None:
    h = H_NAMES
    sig = b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=attacker.test; s=sel;"
    # A signature of the key's length (2048 bits), so that it is checked: a wrong one.
    sig += b" h=" + h + b"; bh=BH; b=" + base64.b64encode(bytes(256)) + b"\r\n"
    message = _many_fields(sig)
    assert len(message) < 256 * 1024  # under every size limit
    codes: list[int] = []
    worst, took = _timed_noops(
        gw_many_fields.port(), lambda c: codes.append(_send_data(c, "x@attacker.test", message))
    )
    assert worst < BUDGET, f"a NOOP waited {worst * 1000:.0f} ms"
    # Linear work, not names x fields: no thread may spend seconds of CPU on it either.
    assert took < 3, f"the message took {took:.1f} s"
    assert codes == [250]  # judged (the signature fails), not refused by a limit


def test_arc_h_of_4000_names_over_20000_fields(gw_many_fields: Gateway) -> None:
    h = H_NAMES
    arc = (
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=attacker.test; s=sel; b=AAAA\r\n"
        b"ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=attacker.test;"
        b" s=sel; h=" + h + b"; bh=BH; b=AAAA\r\n"
        b"ARC-Authentication-Results: i=1; attacker.test; spf=pass\r\n"
    )
    message = _many_fields(arc)
    assert _judged(gw_many_fields.port(), "x@attacker.test", message) == [250]


def test_spf_records_of_thousands_of_terms(gw: Gateway) -> None:
    replies: list[tuple[int, str]] = []
    worst = _worst_noop_while(
        gw.port(), lambda c: replies.append(c.cmd("MAIL FROM:<x@spf.attacker.test>"))
    )
    assert worst < BUDGET, f"a NOOP waited {worst * 1000:.0f} ms"
    # A record past the bound cannot be evaluated: permerror (never a temperror that
    # defers the sender for good), which the default policy does not refuse.
    assert replies and replies[0][0] == 250, replies


@pytest.mark.parametrize("sender", ["macro", "macros", "tabs"])
def test_spf_macro_terms_are_bounded(gw: Gateway, sender: str) -> None:
    replies: list[tuple[int, str]] = []
    worst = _worst_noop_while(
        gw.port(), lambda c: replies.append(c.cmd(f"MAIL FROM:<x@{sender}.attacker.test>"))
    )
    assert worst < BUDGET, f"a NOOP waited {worst * 1000:.0f} ms"
    assert replies and replies[0][0] == 250, replies  # permerror: the default tags it


def test_a_message_that_starts_with_an_empty_line_has_no_header_to_parse(gw: Gateway) -> None:
    big = b"\r\n" + b"a:b\r\n" * 1_500_000 + b"\r\n\r\nbody\r\n"  # 7.5 MB
    codes: list[int] = []
    worst = _worst_noop_while(gw.port(), lambda c: codes.append(_send_data(c, "x@a.test", big)))
    assert worst < BUDGET, f"a NOOP waited {worst * 1000:.0f} ms"
    assert codes and codes[0] in (250, 550, 554), codes


REWRITING = """
rewrite:
  masquerade:
    domains: [example.test]
    headers: true
"""


@pytest.fixture
def gw_rewriting(
    dns: DnsServer, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> Gateway:
    return _gateway(gateway_factory, backend.url, dns, policy=REWRITING)


def _folded(first: bytes, unit: bytes, total: int) -> bytes:
    """`first` and `unit` repeated to about `total` bytes, folded into lines of
    at most 800 octets (a header field's value, as a client may write it)."""
    per_line = 800 // len(unit)
    lines = [unit * per_line] * (total // (per_line * len(unit)))
    return first + b"\r\n ".join(lines)


def test_address_fields_of_thousands_of_comments_with_header_rewriting(
    gw_rewriting: Gateway, backend: Backend
) -> None:
    """A Reply-To whose address is followed by 60,000 comments (the rewriter's
    scanner and the email package's parser both were quadratic in them): left
    alone, at linear cost."""
    value = _folded(b" joe@host.example.test ", b"(c)", 180_000)
    message = b"From: joe@host.example.test\r\nReply-To:" + value + b"\r\nSubject: s\r\n\r\nhi\r\n"
    assert len(message) < 256 * 1024
    codes: list[int] = []
    worst, took = _timed_noops(
        gw_rewriting.port(), lambda c: codes.append(_send_data(c, "x@a.test", message))
    )
    assert worst < BUDGET, f"a NOOP waited {worst * 1000:.0f} ms"
    assert took < 3, f"the message took {took:.1f} s"
    assert codes == [250]
    stored = backend.messages()[-1]["data"]
    assert b"From: joe@example.test\r\n" in stored  # an ordinary field is still rewritten
    assert b"Reply-To: joe@host.example.test (c)(c)" in stored  # this one left alone


def test_a_from_field_of_a_quarter_megabyte(gw: Gateway) -> None:
    """A From value of 200,000 '@' (each cost the email package's address parser
    3 µs): DMARC reads at most a bounded From, and one longer is malformed."""
    message = b"From: a@" + _folded(b"", b"@", 200_000) + b"\r\nSubject: s\r\n\r\nhi\r\n"
    assert len(message) < 256 * 1024
    assert _judged(gw.port(), "x@a.test", message) == [
        550
    ]  # dmarc.malformed: reject, under the default policy


def test_50000_header_fields_are_refused_before_any_check_reads_them(gw: Gateway) -> None:
    """Every field is read by DKIM's, ARC's and DMARC's parsers and the forged-field
    filter (300 ms on the loop for 50,000): past max_header_fields (1,000) the
    message is refused, counted at C speed."""
    arc = (
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=attacker.test; s=sel; b=AAAA\r\n"
        b"ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=attacker.test;"
        b" s=sel; h=from; bh=AAAA; b=AAAA\r\n"
        b"ARC-Authentication-Results: i=1; attacker.test; spf=pass\r\n"
    )
    message = arc + b"a:b\r\n" * 50_000 + b"From: x@attacker.test\r\n\r\nhi\r\n"
    assert len(message) < 256 * 1024
    replies: list[tuple[int, str]] = []

    worst = _worst_noop_while(gw.port(), lambda c: replies.append(_data_reply(c, message)))
    assert worst < BUDGET, f"a NOOP waited {worst * 1000:.0f} ms"
    assert replies == [(552, "552 5.3.4 Message header has too many fields")]


def _data_reply(c: RawClient, message: bytes) -> tuple[int, str]:
    assert c.cmd("MAIL FROM:<x@attacker.test>")[0] == 250
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(message + b".\r\n")
    return c.reply()


def test_a_message_of_the_maximum_size(gw: Gateway, backend: Backend) -> None:
    """25 MB (the default limit) of short lines: every pass over the whole message
    (NUL, bare CR/LF, the copy to the backend) in pieces the loop can wait for."""
    body = b"x" * 20 + b"\r\n"
    message = b"From: x@a.test\r\nSubject: s\r\n\r\n" + body * (25 * 1024 * 1024 // 22 - 10)
    assert len(message) < 25 * 1024 * 1024
    assert _judged(gw.port(), "x@a.test", message) == [250]


def test_a_dkim_b_of_folding_ending_in_a_bad_character(gw_many_fields: Gateway) -> None:
    """dkimpy's base64 pattern backtracks quadratically on such a value (15 s for
    60,000 folded lines); no DNS is needed to reach it."""
    sig = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=attacker.test; s=sel; h=from; bh=AAAA; b=A"
        + b"\r\n " * 40_000
        + b"!\r\n"
    )
    message = sig + b"From: x@attacker.test\r\nSubject: s\r\n\r\nhi\r\n"
    assert _judged(gw_many_fields.port(), "x@a.test", message) == [
        250
    ]  # dkim=permerror: tagged, not refused


def test_an_arc_b_of_vertical_tabs_ending_in_a_bad_character(gw: Gateway) -> None:
    """The same pattern in dkimpy's ARC validation; relaxed canonicalisation keeps
    vertical tabs, so they reach it."""
    arc = (
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=attacker.test; s=sel; b=AAAA\r\n"
        b"ARC-Message-Signature: i=1; a=rsa-sha256; d=attacker.test; s=sel; h=from;"
        b" bh=AAAA; b=A" + b"\x0b" * 40_000 + b"!\r\n"
        b"ARC-Authentication-Results: i=1; relay.attacker.test; spf=pass\r\n"
    )
    message = arc + b"From: x@attacker.test\r\n\r\nhi\r\n"
    assert _judged(gw.port(), "x@a.test", message) == [
        500
    ]  # judged, relayed, and refused by the backend (a 40 KB line)


def test_authentication_results_of_encoded_words(gw: Gateway, backend: Backend) -> None:
    """The email package decodes adjacent encoded words in quadratic time (1.4 s for
    32,000): an id in encoded words is never decoded; the field is removed."""
    token = b"=?a?q??=" * 30_000
    message = (
        b"From: x@attacker.test\r\nAuthentication-Results: " + token + b"gw.test; spf=pass\r\n"
        b"Subject: s\r\n\r\nhi\r\n"
    )
    assert _judged(gw.port(), "x@a.test", message) == [250]
    assert b"=?a?q??=" not in backend.messages()[-1]["data"]


@pytest.fixture
def gw_normalizing(
    dns: DnsServer, tmp_path: Path, gateway_factory: Callable[..., Gateway]
) -> Gateway:
    # Delivered to the embedded Maildir: the test backend parses a message line by
    # line in Python, and 24 million lines would take it minutes.
    url = f"maildir:{tmp_path / 'mail'}"
    return _gateway(gateway_factory, url, dns, bare_linefeed="normalize")


def test_25_mb_of_bare_line_feeds_normalised(gw_normalizing: Gateway) -> None:
    """Every line end made CRLF, and the unstuffed copy the checks read, a piece at a
    time in a thread (one replace over the whole held the loop for 100 ms and more)."""
    message = b"From: x@a.test\nSubject: s\n\n" + b"\n" * 24_000_000 + b"end\r\n"
    assert _judged(gw_normalizing.port(), "x@a.test", message) == [250]


def test_a_header_of_60000_continuation_lines_is_refused_unread(gw: Gateway) -> None:
    """One field folded into 60,000 lines (a non-ASCII header, so DMARC's reader is
    the email package's, 100 ms for it): past max_header_lines (10,000), refused
    before any check reads it."""
    message = (
        b"From: x@attacker.test\r\nX-A: \xc3\xa9\r\n"
        + b" a\r\n" * 60_000
        + b"Subject: s\r\n\r\nhi\r\n"
    )
    assert len(message) < 256 * 1024
    replies: list[tuple[int, str]] = []
    worst = _worst_noop_while(gw.port(), lambda c: replies.append(_data_reply(c, message)))
    assert worst < BUDGET, f"a NOOP waited {worst * 1000:.0f} ms"
    assert replies == [(552, "552 5.3.4 Message header has too many lines")]
