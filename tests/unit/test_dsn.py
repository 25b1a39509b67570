"""RFC 3461 parameter syntax (pure functions; the SMTP side is in integration/test_dsn.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import dsn
from gateway.dsn import xtext


@pytest.mark.parametrize(
    ("key", "value", "want"),
    [
        ("RET", "full", "RET=FULL"),
        ("RET", "Hdrs", "RET=HDRS"),
        ("RET", "ALL", None),
        ("RET", None, None),
        ("ENVID", "abc+2Bdef", "ENVID=abc+2Bdef"),
        ("ENVID", "a+2b", None),  # hex digits are upper-case in xtext
        ("ENVID", "a+", None),
        ("ENVID", "x" * 100, "ENVID=" + "x" * 100),
        ("ENVID", "x" * 101, None),
        ("ENVID", "a\u00e9", None),
    ],
)
def test_mail_params(key: str, value: str | None, want: str | None) -> None:
    assert dsn.mail_param(key, value) == want


@pytest.mark.parametrize(
    ("key", "value", "utf8", "want"),
    [
        ("NOTIFY", "never", False, "NOTIFY=NEVER"),
        ("NOTIFY", "delay,Success,FAILURE", False, "NOTIFY=DELAY,SUCCESS,FAILURE"),
        ("NOTIFY", "NEVER,DELAY", False, None),
        ("NOTIFY", "DELAY,DELAY", False, None),
        ("NOTIFY", "SUCCESS,", False, None),
        ("ORCPT", "rfc822;a+2Bb@example.test", False, "ORCPT=rfc822;a+2Bb@example.test"),
        ("ORCPT", "RFC822;a@x", False, "ORCPT=RFC822;a@x"),
        ("ORCPT", "rfc822;a=b@x", False, None),
        ("ORCPT", "rfc 822;a@x", False, None),
        ("ORCPT", "utf-8;j\u00f6@x", True, "ORCPT=utf-8;j\u00f6@x"),
        ("ORCPT", "utf-8;j\u00f6@x", False, None),
        ("ORCPT", "utf-8;j\\x{F6}@x", False, "ORCPT=utf-8;j\\x{F6}@x"),
        ("ORCPT", "utf-8;j\\y@x", True, None),  # a backslash only as \x{...}
        ("ORCPT", "rfc822;" + "a" * 493, False, "ORCPT=rfc822;" + "a" * 493),
        ("ORCPT", "rfc822;" + "a" * 494, False, None),  # over 500 characters
    ],
)
def test_rcpt_params(key: str, value: str, utf8: bool, want: str | None) -> None:
    assert dsn.rcpt_param(key, value, utf8) == want


def test_orcpt_for_a_rewritten_recipient() -> None:
    assert dsn.orcpt_for("a+b=c@example.test") == "ORCPT=rfc822;a+2Bb+3Dc@example.test"
    assert dsn.orcpt_for("j\u00f6@example.test") is None


def test_for_backend_drops_only_dsn_parameters_and_only_without_dsn() -> None:
    params = ["SIZE=10", "RET=HDRS", "ENVID=x", "BODY=8BITMIME"]
    assert dsn.for_backend(params, {"DSN": ""}, dsn.MAIL_KEYS) is params
    assert dsn.for_backend(params, {}, dsn.MAIL_KEYS) == ["SIZE=10", "BODY=8BITMIME"]
    assert dsn.for_backend(["NOTIFY=NEVER", "ORCPT=rfc822;a@x"], {}, dsn.RCPT_KEYS) == []


def test_xtext_parameters_are_decoded_checked_and_passed_on_octet_for_octet() -> None:
    """What ENVID and ORCPT stand for is octets: a control character among them is
    refused (a backend would write it into its DSN), and octets of 128 and up go on
    exactly as they came, never read as Latin-1 and encoded again."""
    assert dsn.mail_param("ENVID", "caf+C3+A9+FF") == "ENVID=caf+C3+A9+FF"
    assert dsn.mail_param("ENVID", "line+E2+80+A8sep") == "ENVID=line+E2+80+A8sep"
    assert dsn.mail_param("ENVID", "x+0D+0AX-Injected:+20yes") is None
    assert dsn.mail_param("ENVID", "x+7F") is None
    assert dsn.mail_param("ENVID", "") is None
    orcpt = dsn.rcpt_param("ORCPT", "rfc822;caf+C3+A9@example.org", False)
    assert orcpt == "ORCPT=rfc822;caf+C3+A9@example.org"
    assert dsn.rcpt_param("ORCPT", "rfc822;a+0Ab@example.org", False) is None


def test_xtext() -> None:
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"


@settings(max_examples=600, derandomize=True)
@given(st.text(max_size=12))
def test_xtext_fast_path_matches_the_rfc_definition(s: str) -> None:
    from gateway.dsn import xtext

    ref = "".join(
        chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}"
        for b in s.encode("utf-8", "surrogateescape")
    )
    assert xtext(s) == ref
