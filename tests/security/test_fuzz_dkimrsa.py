"""Our DKIM parsers and canonicalisation against dkimpy's, on thousands of generated
inputs each: the same result, or the same exception with the same text.

The fuzzing side of tests/unit/checks/test_dkimrsa.py (which keeps the examples); here
because each property runs thousands of examples (over 20 s together).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dkim
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks import dkimrsa


@settings(max_examples=3000, derandomize=True)
@given(st.binary(max_size=40).map(lambda b: bytes(b"ab=; \t\r\nhAZ9+/|:"[x % 16] for x in b)))
def test_b_tag_stripping_matches_dkimpys_pattern(value: bytes) -> None:
    for v in (value, b" v=1; b=" + value, b"a=rsa; b=" + value + b"\r\n"):
        assert dkimrsa.strip_b(v) == dkim.RE_BTAG.sub(b"\\1", v)


@settings(max_examples=3000, derandomize=True)
@given(
    st.binary(max_size=6).map(lambda b: bytes(b"Ab- \t"[x % 5] for x in b)),
    st.binary(max_size=24).map(lambda b: bytes(b" \tab\r\n;=\x0b"[x % 9] for x in b)),
    st.sampled_from([b"", b"\r\n", b"\n", b" \r\n"]),
)
def test_relaxed_field_matches_dkimpys(name: bytes, value: bytes, end: bytes) -> None:
    """Both paths of our relaxed header canonicalisation (the unfolded fast one and
    the regex one) against dkimpy's."""
    from dkim.canonicalization import Relaxed

    (theirs,) = Relaxed.canonicalize_headers([[name, value + end]])
    assert list(dkimrsa.relaxed_field(name, value + end)) == list(theirs)


@settings(max_examples=5000, derandomize=True)
@given(st.binary(max_size=30).map(lambda b: bytes(b"ab=; \t\r\n1_-\x0b\xe9AZ"[x % 15] for x in b)))
def test_tag_list_parsing_matches_dkimpys(tag_list: bytes) -> None:
    """Our tag-list parser against dkimpy's parse_tag_value: the same tags, or the
    same exception class with the same argument."""
    from dkim.util import InvalidTagValueList, parse_tag_value

    def run(parse: Callable[[bytes], Any]) -> Any:
        try:
            return parse(tag_list)
        except InvalidTagValueList as e:
            return (type(e), e.args)

    assert run(dkimrsa.parse_tags) == run(parse_tag_value)


@settings(max_examples=3000, derandomize=True)
@given(
    st.lists(st.sampled_from([b"From", b"from", b"To", b"Subject", b"X-A", b"x-a"]), max_size=8),
    st.lists(st.sampled_from([b"from", b"to", b"subject", b"x-a", b"cc"]), max_size=8),
)
def test_header_selection_matches_dkimpys(names: list[bytes], include: list[bytes]) -> None:
    headers = [[n, b" %d\r\n" % i] for i, n in enumerate(names)]
    assert dkimrsa.select_headers(headers, include) == dkim.select_headers(headers, include)


_NOW = 1_790_000_000
_FIELD_VALUES: dict[bytes, list[bytes]] = {
    b"v": [b"1", b"2", b"", b" 1"],
    b"a": [b"rsa-sha256", b"rsa-sha1", b"ed25519-sha256", b"rsa-md5", b""],
    b"b": [b"AAAA", b"AAA", b"AA==", b"A A A A", b"AAAA\n", b"AA=A", b"@@@@", b"", b"A\tAA\x0bA"],
    b"bh": [b"AAAA", b"AAA", b"AA==", b"A A\r\nAA", b"", b"AAAAA===", b"@@@@"],
    b"d": [b"example.test", b"Example.TEST", b"ex(ample).test", b"\xe9x.test", b"", b"a@b", b"x,y"],
    b"h": [b"from"],
    b"s": [b"s1"],
    b"i": [b"@example.test", b"u@Example.test", b"u@sub.example.test", b"example.test", b"",
           b"u@other.test", b".example.test", b"uexample.test", b"x.example.test", b"t"],
    b"l": [b"", b"12", b"12a", b"1" * 76, b"1" * 77, b"12\n"],
    b"q": [b"dns/txt", b"dns", b""],
    b"t": [b"%d" % _NOW, b"%d" % (_NOW + 36001), b"%d" % (_NOW + 36000), b"abc", b"", b"12\n"],
    b"x": [b"%d" % (_NOW - 36001), b"%d" % _NOW, b"%d" % (_NOW + 10), b"5", b"abc", b""],
    b"cv": [b"pass", b"fail", b"none", b"maybe"],
}  # fmt: skip
_MANDATORY = [b"v", b"a", b"b", b"bh", b"d", b"h", b"s"]
# Mandatory tags mostly present and mostly valid (the first value of each list),
# so that every later check is reached; now and then one is missing.
_signature_fields = st.tuples(
    st.fixed_dictionaries(
        {k: st.one_of(st.just(_FIELD_VALUES[k][0]), st.sampled_from(_FIELD_VALUES[k]))
         for k in _MANDATORY},
        optional={k: st.sampled_from(v) for k, v in _FIELD_VALUES.items() if k not in _MANDATORY},
    ),
    st.lists(st.sampled_from(_MANDATORY), max_size=1),
).map(lambda t: {k: v for k, v in t[0].items() if k not in t[1]})  # fmt: skip


@settings(max_examples=5000, derandomize=True)
@given(_signature_fields)
def test_signature_field_validation_matches_dkimpys(sig: dict[bytes, bytes]) -> None:
    """Our validation against dkimpy's: both accept, or both raise ValidationError
    with the same text. Where dkimpy's i= check indexes off the front of the value
    (IndexError), ours refuses the signature instead, with dkimpy's i= message."""
    from unittest import mock

    def run(validate: Callable[[dict[bytes, bytes]], None]) -> Any:
        try:
            with mock.patch("time.time", return_value=float(_NOW)):
                validate(dict(sig))
        except (dkim.ValidationError, IndexError) as e:
            return (type(e), e.args)
        return None

    theirs, ours = run(dkim.validate_signature_fields), run(dkimrsa.validate_signature_fields)
    if theirs is not None and theirs[0] is IndexError:
        message = f"i= domain is not a subdomain of d= (i={sig[b'i']!r} d={sig[b'd']!r})"
        assert ours == (dkim.ValidationError, (message,))
    else:
        assert ours == theirs


# Bytes where relaxed body canonicalisation has something to do: runs of spaces
# and tabs of any length, in lines, at their ends, alone, and bare CR or LF.
_BODY_PIECES = st.sampled_from(
    [b"a", b"xy", b" ", b"  ", b"\t", b" \t ", b" " * 17, b" " * 5, b"\r\n", b"\r", b"\n"]
)


@settings(max_examples=2000)
@given(st.lists(_BODY_PIECES, max_size=60).map(b"".join))
def test_relaxed_body_matches_dkimpys(body: bytes) -> None:
    from dkim.canonicalization import Relaxed

    assert dkimrsa.relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=3000, derandomize=True)
@given(
    st.binary(max_size=24).map(lambda b: bytes(b" \t\r\n\x0b\x0c=aZ9+/-!\x00"[x % 15] for x in b))
)
def test_base64ish_is_dkimpys_pattern_in_linear_time(value: bytes) -> None:
    import re

    expected = re.match(rb"[\s0-9A-Za-z+/]+[\s=]*$", value) is not None
    assert dkimrsa.base64ish(value) == expected


def test_base64ish_of_a_long_run_of_white_space_is_linear() -> None:
    """The value that held the loop for 15 s through dkimpy's pattern (60,000
    folded lines ending in a character base64 does not have)."""
    import time

    value = b"A" + b"\r\n " * 60_000 + b"!"
    start = time.perf_counter()
    assert not dkimrsa.base64ish(value)
    assert time.perf_counter() - start < 0.05
