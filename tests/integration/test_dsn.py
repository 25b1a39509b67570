"""DSN (RFC 3461) through real SMTP sessions: the request reaches the backend intact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.security.helpers import greeted
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient

MSG = b"From: a@sender.test\r\nTo: x@example.test\r\nSubject: dsn\r\n\r\nbody\r\n.\r\n"


def converse(port: int, mail: str, rcpts: list[str]) -> list[tuple[int, str]]:
    """EHLO (asserting DSN is offered), MAIL, the RCPTs and a message; every reply."""
    with RawClient(port) as c:
        c.reply()
        code, ehlo = c.cmd("EHLO client.test")
        assert code == 250 and "250-DSN" in ehlo.split("\n"), ehlo
        out = [c.cmd(f"MAIL FROM:{mail}")]
        out += [c.cmd(f"RCPT TO:{r}") for r in rcpts]
        if c.cmd("DATA")[0] == 354:
            c.send(MSG)
            out.append(c.reply())
        c.cmd("QUIT")
    return out


@pytest.mark.parametrize(
    "backend_args, defer_mail",
    [(("--dsn", "--pipelining"), True), (("--dsn",), True), (("--dsn",), False)],
)
def test_dsn_parameters_reach_a_backend_that_offers_dsn(
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
    backend_args: tuple[str, ...],
    defer_mail: bool,
) -> None:
    """Keywords upper-cased, values as written (ENVID and ORCPT are the sender's
    own tokens), on the first RCPT (sent with MAIL when deferred) and later ones."""
    be = backend_factory(*backend_args)
    gw = gateway_factory(base_config(be.url, backend={"defer_mail": defer_mail}))
    got = converse(
        gw.port(),
        "<a@sender.test> ret=hdrs ENVID=Q+2B1x.abc",
        [
            "<x@example.test> NOTIFY=success,Delay ORCPT=rfc822;X+2Bt@Example.test",
            "<y@example.test> notify=NEVER",
            "<z@example.test>",
        ],
    )
    assert [code for code, _ in got] == [250, 250, 250, 250, 250], got
    [m] = be.messages()
    assert m["dsn_mail"] == ["RET=HDRS", "ENVID=Q+2B1x.abc"]
    assert m["dsn_rcpt"] == {
        "x@example.test": ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;X+2Bt@Example.test"],
        "y@example.test": ["NOTIFY=NEVER"],
    }
    assert m["rcpt_tos"] == ["x@example.test", "y@example.test", "z@example.test"]


def test_dsn_parameters_are_dropped_for_a_backend_without_dsn(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """The backend would refuse them (555, as this one does): the mail goes through
    without them. The gateway writes no DSN itself; it holds no queue."""
    be = backend_factory("--pipelining")
    gw = gateway_factory(base_config(be.url))
    got = converse(
        gw.port(),
        "<a@sender.test> RET=FULL ENVID=e1 SIZE=100",
        [
            "<x@example.test> NOTIFY=FAILURE ORCPT=rfc822;x@example.test",
            "<y@example.test> NOTIFY=NEVER",
        ],
    )
    assert [code for code, _ in got] == [250, 250, 250, 250], got
    [m] = be.messages()
    assert m["rcpt_tos"] == ["x@example.test", "y@example.test"]
    assert m["mail_options"] == ["SIZE=100"]
    sent = [c for c in be.commands() if c.startswith(("MAIL", "RCPT"))]
    assert not any(k in c for c in sent for k in ("RET=", "ENVID=", "NOTIFY=", "ORCPT=")), sent


MAIL_BAD = [
    "RET=ALL",
    "RET",
    "ENVID=" + "e" * 101,
    "ENVID=a+zz",  # "+" must start two upper-case hex digits
    "ENVID=a=b",
    "RET=FULL RET=HDRS",  # duplicate
]
RCPT_BAD = [
    "NOTIFY=NEVER,SUCCESS",  # NEVER stands alone
    "NOTIFY=SUCCESS,SUCCESS",
    "NOTIFY=SOMETIMES",
    "NOTIFY=",
    "ORCPT=x@example.test",  # no address type
    "ORCPT=;x@example.test",
    "ORCPT=rfc822;",
    "ORCPT=rfc822;" + "x" * 500,
    "ORCPT=utf-8;j\u00f6@example.test",  # UTF-8 only in an SMTPUTF8 transaction
]


def test_malformed_dsn_parameters_are_refused_with_501_and_the_session_goes_on(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    be = backend_factory("--dsn")
    gw = gateway_factory(base_config(be.url))
    with greeted(gw.port()) as c:
        for bad in MAIL_BAD:
            code, text = c.cmd(f"MAIL FROM:<a@sender.test> {bad}")
            assert (code, text[4:9]) == (501, "5.5.4"), (bad, text)
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        for bad in RCPT_BAD:
            code, text = c.cmd(f"RCPT TO:<x@example.test> {bad}".encode())
            assert (code, text[4:9]) == (501, "5.5.4"), (bad, text)
        code, text = c.cmd("RCPT TO:<x@example.test> FOO=1")
        assert (code, text[4:9]) == (555, "5.5.4"), text
        assert c.cmd("RCPT TO:<x@example.test> NOTIFY=DELAY")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(MSG)
        assert c.reply()[0] == 250
    [m] = be.messages()
    assert m["dsn_rcpt"] == {"x@example.test": ["NOTIFY=DELAY"]}


def test_utf8_orcpt_in_an_smtputf8_transaction(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """RFC 6533: with SMTPUTF8, ORCPT=utf-8; may carry the UTF-8 address itself."""
    be = backend_factory("--dsn")
    gw = gateway_factory(base_config(be.url))
    orcpt = "ORCPT=utf-8;j\u00f6@example.test"
    got = converse(gw.port(), "<a@sender.test> SMTPUTF8", [f"<x@example.test> {orcpt}"])
    assert [code for code, _ in got] == [250, 250, 250], got
    assert be.messages()[0]["dsn_rcpt"] == {"x@example.test": [orcpt]}


POLICY = """
rewrite:
  virtual_alias:
    file: aliases
  srs:
    enabled: true
    domain: srs.example.test
    secrets: [a-secret]
"""
ALIASES = """\
team@example.test alice@example.test, bob@example.test
fwd@example.test friend@outside.test
"""


def test_a_rewritten_recipient_carries_its_original_in_orcpt(
    tmp_path: Path,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    """So the backend's DSNs name the address the sender used (Original-Recipient).
    The forward to outside.test reopens the backend transaction with an SRS sender;
    the recipients replayed then keep their DSN parameters."""
    (tmp_path / "gw0").mkdir()
    (tmp_path / "gw0" / "aliases").write_text(ALIASES)
    be = backend_factory("--dsn", "--pipelining")
    cfg = base_config(be.url, local_domains=["example.test", "srs.example.test"])
    gw = gateway_factory(cfg, policy=POLICY)
    got = converse(
        gw.port(),
        "<s@orig.test> RET=HDRS",
        [
            "<dave@example.test> NOTIFY=FAILURE",  # not rewritten: nothing added
            "<team@example.test> NOTIFY=SUCCESS",
            "<fwd@example.test> ORCPT=rfc822;given@example.test",  # the client's kept
        ],
    )
    assert [code for code, _ in got] == [250, 250, 250, 250, 250], got
    [m] = be.messages()
    assert m["mail_from"].startswith("SRS0=")
    assert m["dsn_mail"] == ["RET=HDRS"]
    team = ["NOTIFY=SUCCESS", "ORCPT=rfc822;team@example.test"]
    assert m["dsn_rcpt"] == {
        "dave@example.test": ["NOTIFY=FAILURE"],
        "alice@example.test": team,
        "bob@example.test": team,
        "friend@outside.test": ["ORCPT=rfc822;given@example.test"],
    }
