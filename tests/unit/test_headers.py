"""The cached Authentication-Results header is byte for byte what authres formats,
and the fast unquoted-path split agrees with the quote-aware walk."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import headers
from gateway.vocab import AuthResult

words = st.text(alphabet="abcdefgh.-@ =;()", min_size=1, max_size=12)
value = st.from_regex(r"[a-z0-9.@-]{1,20}", fullmatch=True)
PROPS = {  # the properties each check records
    "spf": ["smtp.mailfrom"],
    "dkim": ["header.d", "header.s", "header.a"],
    "dmarc": ["header.from", "policy.dmarc"],
    "arc": [],
}


def _result(method: str) -> st.SearchStrategy[AuthResult]:
    return st.builds(
        AuthResult,
        method=st.just(method),
        result=st.sampled_from(["pass", "fail", "none", "temperror", "neutral"]),
        props=st.dictionaries(st.sampled_from(PROPS[method] or ["x"]), value, max_size=3)
        if PROPS[method]
        else st.just({}),
        reason=st.one_of(st.just(""), words),
    )


results = st.lists(st.one_of([_result(m) for m in PROPS]), max_size=4)


@settings(max_examples=120, deadline=None)
@given(results, st.sampled_from(["mx.gw.test", "gw.example"]))
def test_cached_header_is_what_authres_formats(res: list[AuthResult], authserv: str) -> None:
    expected = headers._format_results(authserv, res)
    assert headers.authentication_results(authserv, res) == expected
    assert headers.authentication_results(authserv, list(res)) == expected  # from the cache


def test_different_results_never_share_a_cached_header() -> None:
    a = [AuthResult("spf", "pass", {"smtp.mailfrom": "a@x.test"})]
    b = [AuthResult("spf", "pass", {"smtp.mailfrom": "b@x.test"})]
    c = [AuthResult("spf", "fail", {"smtp.mailfrom": "a@x.test"})]
    out = {headers.authentication_results("gw", r) for r in (a, b, c, a)}
    assert len(out) == 3
    assert b"spf=none" not in headers.authentication_results("gw", [])
    assert headers.authentication_results("gw", []).endswith(b"; none\r\n")


def _received_fields(wire: bytes) -> int:
    """The slow reading of the same rule: header lines (not continuations) whose field
    name, trailing blanks aside, is Received in any case. A message that starts with
    an empty line has no header fields (RFC 5322 2.1)."""
    head = b"" if wire.startswith(b"\r\n") else wire.split(b"\r\n\r\n", 1)[0]
    n = 0
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") or b":" not in line:
            continue
        n += line.split(b":", 1)[0].rstrip(b" \t").lower() == b"received"
    return n


field_names = st.sampled_from(
    [
        b"Received",
        b"received",
        b"RECEIVED",
        b"ReCeIvEd",
        b"Received ",
        b"Received-SPF",
        b"X-Received",
        b"Subject",
        b"receivedx",
    ]
)
header_line = st.tuples(field_names, st.booleans()).map(
    lambda t: t[0] + b": from x by y" + (b"\r\n\tReceived: folded" if t[1] else b"")
)


@settings(max_examples=400)
@given(
    st.lists(header_line, max_size=12),
    st.integers(min_value=0, max_value=12),
    st.integers(min_value=0, max_value=8),
)
def test_too_many_received_counts_header_fields_only(
    lines: list[bytes], body_received: int, limit: int
) -> None:
    """The quick bound never decides wrongly: the answer is the exact count of
    Received fields against the limit, whatever the case, continuation lines,
    look-alike names or Received lines in the body."""
    wire = b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    wire += b"Received: in the body\r\n" * body_received
    assert headers.too_many_received(wire, limit) == (_received_fields(wire) > limit)


OURS = headers.our_fields("gw.example", "gw.example", ("X-Gateway-Tag",))


def _forged(value: str) -> int:
    wire = b"Authentication-Results: " + value.encode() + b"\r\n\r\nbody\r\n"
    return headers.strip_forged(wire, OURS)[1]


@pytest.mark.parametrize(
    "value",
    [
        "gw.example; dkim=pass",
        "GW.Example. 1; dkim=pass",
        "\uff47\uff57.example; dkim=pass",  # full-width letters
        "gw\u3002example; dkim=pass",  # the ideographic full stop
        "gw.exam\u00adple; dkim=pass",  # a soft hyphen
        "gw.example\u200b; dkim=pass",  # a zero-width space
        "gw.example\ufe0f; dkim=pass",  # a variation selector
    ],
)
def test_results_in_any_spelling_of_our_name_are_removed(value: str) -> None:
    assert _forged(value) == 1


@pytest.mark.parametrize(
    "value", ["gw.example1; dkim=pass", "xgw.example; dkim=pass", "gw.example.org; spf=pass"]
)
def test_results_of_other_names_stay(value: str) -> None:
    assert _forged(value) == 0


@pytest.mark.parametrize(
    "value",
    [
        "=?utf-8?q?gw.exa?= =?utf-8?q?mple?=; spf=pass",  # split over encoded words
        "=?utf-8?q?gw.example=3B?= dkim=pass",  # the ";" encoded
        "=?utf-8*en?q?gw.example?=; dkim=pass",  # RFC 2231 language: LookupError once
        "=?utf-8?b?A?=; spf=pass",  # broken base64: HeaderParseError once (a crash)
        "=?\u00e9?q?x?=; spf=pass",  # CharsetError once
        "=?a?q??=" * 20_000 + "gw.example; spf=pass",  # 1.4 s in decode_header once
        "gw\\.example; dkim=pass",  # a backslash outside quotes, which readers drop
        "gw.example\\; dkim=pass",
        "gw\u200c.example; dkim=pass",  # zero-width non-joiner
        "GW.EXAMPLE\u200d; dkim=pass",  # zero-width joiner
    ],
)
def test_results_under_an_id_in_encoded_words_or_joiners_are_removed(value: str) -> None:
    import time

    start = time.perf_counter()
    assert _forged(value) == 1
    assert time.perf_counter() - start < 0.05


def test_received_spf_naming_us_in_full_width_is_removed() -> None:
    wire = "Received-SPF: pass receiver=\uff47\uff57.example; client-ip=192.0.2.1\r\n\r\nb\r\n"
    assert headers.strip_forged(wire.encode(), OURS)[1] == 1


def test_a_client_value_cannot_add_results_to_ours() -> None:
    """A HELO (or sender domain, or d=) with ";", spaces or parentheses: one value in
    our field, never results of its own."""
    import authres

    helo = "x@y.test;dmarc=pass(forged) header.from=bank.test;\tdkim=pass"
    field = headers.authentication_results(
        "gw.example", [AuthResult("spf", "none", {"smtp.helo": helo})]
    )
    value = field.decode().split(":", 1)[1].replace("\r\n", "")
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    assert [r.method for r in parsed.results] == ["spf"]
    assert parsed.authserv_id == "gw.example"


def test_compose_removes_forged_fields_and_puts_ours_in_order() -> None:
    """One function makes the header section the backend gets: the client's field
    in our name removed; Received on top, then the extra field, A-R, tag, quarantine."""
    from gateway.vocab import AuthResult

    ours = headers.our_fields("mx.test", "mx.test", ("X-Tag", "X-Q"))
    wire = (
        b"Authentication-Results: mx.test; dmarc=pass\r\nX-Tag: forged\r\n"
        b"Subject: s\r\n\r\nbody\r\n"
    )
    verdicts = headers.Verdicts(
        "mx.test", [AuthResult("spf", "pass", {"smtp.mailfrom": "a.test"})], "X-Tag",
        ["spf.softfail"], ("X-Q", ["u@b.test"]),
    )  # fmt: skip
    out, prefix, forged = headers.compose(
        wire, b"Received: x\r\n", ours, verdicts, b"X-Original-To: u@b.test\r\n"
    )
    assert forged == 2 and out == b"Subject: s\r\n\r\nbody\r\n"
    names = [line.split(b":")[0] for line in prefix.split(b"\r\n") if line and line[0] > 32]
    assert names == [b"Received", b"X-Original-To", b"Authentication-Results", b"X-Tag", b"X-Q"]
    assert b"spf=pass smtp.mailfrom=a.test" in prefix
    plain = headers.Verdicts("mx.test", [], "X-Tag", [])
    out, prefix, forged = headers.compose(b"Subject: s\r\n\r\n", b"Received: x\r\n", ours, plain)
    assert forged == 0 and prefix == b"Received: x\r\nAuthentication-Results: mx.test; none\r\n"
