"""Random SMTP conversations against a live gateway and backend (hypothesis).

Invariants, checked after every conversation:
- every reply is a well-formed SMTP reply (code, continuation, enhanced code);
- the gateway never crashes and never leaks a session (active connections back to 0);
- the backend holds exactly the messages the client got a 250 for after DATA, and
  each with only recipients the client got a 250 for.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.procs import ROOT, Backend, Gateway, base_config
from tests.support.smtp import RawClient

REPLY = re.compile(r"^([2-5][0-9][0-9])([ -])(.*)$")
ENHANCED = re.compile(r"^([245])\.[0-9]{1,3}\.[0-9]{1,3}( |$)")
TOKENS = itertools.count(1)


@pytest.fixture(scope="module", params=["trusted", "untrusted"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Backend]]:
    """Once from a trusted network, once untrusted: then `enforce_sync` watches every
    command, and a client that always waits for our reply must never trip it. (No
    checks in the untrusted run: they would need DNS.)"""
    tmp = tmp_path_factory.mktemp("fsm")
    be = Backend(
        tmp / "spool", "--reject-rcpt", "bad@example.test", "--tempfail-rcpt", "grey@example.test"
    )
    cfg = base_config(be.url, limits={"max_recipients": 5, "max_errors": 10})
    if request.param == "untrusted":
        cfg.update(trusted_networks=[], policy=str(ROOT / "bench/proxy-policy.yaml"))
    gw = Gateway(tmp / "gw", cfg)
    yield gw, be
    gw.stop()
    be.stop()


sender = st.sampled_from(
    ["<a@src.test>", "<>", "<broken", "<a@src.test> SIZE=100", "<a@src.test> FOO=1",
     "<a@src.test> BODY=8BITMIME", "<a@src.test> SIZE=999999999999"]
)  # fmt: skip
rcpt = st.sampled_from(
    ["<ok@example.test>", "<other@example.test>", "<bad@example.test>", "<grey@example.test>",
     "<x@remote.test>", "<broken", "<u%remote.test@example.test>", "<ok@example.test> NOTIFY=NEVER"]
)  # fmt: skip
payload = st.binary(max_size=200)
UNICODE = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12
)
command = st.one_of(
    st.tuples(st.sampled_from(["EHLO", "HELO"]), st.sampled_from(["c.test", "", "x y"])),
    st.tuples(st.just("MAIL FROM:"), sender),
    st.tuples(st.just("RCPT TO:"), rcpt),
    st.tuples(st.just("DATA"), payload),
    st.tuples(st.sampled_from(["RSET", "NOOP", "VRFY", "HELP", "QUIT", "STARTTLS", "BDAT"]),
              st.just("")),
    st.tuples(st.just("RAW"), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                                      max_size=40)),
    # All of Unicode (but CR and LF, which end the line, and lone surrogates, which
    # UTF-8 cannot carry): in a command of its own, as a MAIL or RCPT parameter (Python
    # takes superscripts and Arabic-Indic digits for digits), and as an address.
    st.tuples(st.just("RAW"), UNICODE),
    st.tuples(st.just("MAIL FROM:"), UNICODE.map(lambda t: f"<a@src.test> SIZE={t}")),
    st.tuples(st.just("MAIL FROM:"), UNICODE.map(lambda t: f"<{t}@src.test> SMTPUTF8")),
    st.tuples(st.just("RCPT TO:"), UNICODE.map(lambda t: f"<ok@{t}example.test>")),
    st.tuples(st.just("RCPT TO:"), UNICODE.map(lambda t: f"<ok@example.test> ORCPT=rfc822;{t}")),
)  # fmt: skip


def check_reply(code: int, text: str) -> None:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = REPLY.match(line)
        assert m, f"malformed reply line {line!r}"
        assert int(m.group(1)) == code
        assert m.group(2) == ("-" if i < len(lines) - 1 else " ")
        rest = m.group(3)
        if ENHANCED.match(rest):
            assert rest[0] == str(code)[0], line  # 2.x.x with 2yz, 4.x.x with 4yz ...


def wire(body: bytes, token: int) -> bytes:
    content = b"X-Token: %d\r\nSubject: fuzz\r\n\r\n" % token + body
    content = content.replace(b"\r\n.", b"\r\n..")
    return content + (b"" if content.endswith(b"\r\n") else b"\r\n") + b".\r\n"


def converse(port: int, commands: list[tuple[str, Any]]) -> dict[int, set[str]]:
    """Run one conversation; return {token: recipients accepted} for DATA that got 250."""
    delivered: dict[int, set[str]] = {}
    accepted: set[str] = set()
    with RawClient(port, timeout=15) as c:
        code, text = c.reply()
        check_reply(code, text)
        for verb, arg in commands:
            if verb == "DATA":
                code, text = c.cmd("DATA")
                if code == 354:
                    token = next(TOKENS)
                    c.send(wire(arg, token))
                    code, text = c.reply()
                    if code == 250:
                        delivered[token] = set(accepted)
                    accepted = set()
            elif verb == "RAW":
                code, text = c.cmd(arg)
            else:
                line = f"{verb}{arg}" if verb.endswith(":") else f"{verb} {arg}".strip()
                code, text = c.cmd(line)
            if code == 0:
                break  # the gateway closed the session (QUIT, 421)
            check_reply(code, text)
            assert not text.startswith("554 5.5.0"), (
                f"a client that waits taken as out of sync: {verb}"
            )
            if verb == "RCPT TO:" and code == 250:
                accepted.add(arg.split(">")[0].strip("<").lower())
            if verb in ("MAIL FROM:", "RSET", "EHLO", "HELO") and code == 250:
                accepted = set() if verb != "MAIL FROM:" else accepted
            if code == 221 or code == 421:
                break
    return delivered


def active(gw: Gateway) -> float:
    return gw.metric("smtp_gateway_active_connections{")


# Mostly well-formed transactions with noise in between, so that mail does get
# through (random commands alone almost never make a transaction).
transaction = st.tuples(
    st.tuples(st.just("MAIL FROM:"), st.one_of(st.just("<a@src.test>"), sender)),
    st.lists(st.tuples(st.just("RCPT TO:"), rcpt), min_size=1, max_size=7),
    st.tuples(
        st.just("DATA"),
        st.one_of(
            payload,
            st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200).map(
                lambda t: t.replace(" ", "\r\n", 3).encode()
            ),
        ),
    ),
).map(lambda t: [t[0], *t[1], t[2]])
conversation = st.tuples(
    st.sampled_from([[("EHLO", "c.test")], [("HELO", "c.test")], []]),
    st.lists(st.one_of(transaction, command.map(lambda c: [c])), min_size=1, max_size=6),
).map(lambda t: t[0] + [c for group in t[1] for c in group])


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same conversations in every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(conversation)
def test_random_conversations_keep_the_invariants(
    live: tuple[Gateway, Backend], commands: list[tuple[str, Any]]
) -> None:
    gw, be = live
    before = {_token(m["data"]) for m in be.messages()}
    delivered = converse(gw.port(), commands)
    assert gw.proc.poll() is None, "the gateway died"
    deadline = time.monotonic() + 5
    while active(gw) != 0:
        assert time.monotonic() < deadline, "a session leaked"
        time.sleep(0.05)
    now = {(_token(m["data"]), frozenset(r.lower() for r in m["rcpt_tos"])) for m in be.messages()}
    new = {(t, r) for t, r in now if t not in before}
    assert {t for t, _ in new} == set(delivered), "backend and client disagree"
    for token, rcpts in new:
        assert rcpts <= delivered[token], f"recipients the client was not told of: {rcpts}"


def _token(data: bytes) -> int:
    m = re.search(rb"X-Token: (\d+)", data)
    return int(m.group(1)) if m else -1


def test_the_invariants_can_fail(live: tuple[Gateway, Backend]) -> None:
    """The checker itself: a malformed reply is caught."""
    with pytest.raises(AssertionError):
        check_reply(250, "250-first\n251 second")
    with pytest.raises(AssertionError):
        check_reply(550, "550 2.1.0 contradicting class")
    assert Path(live[1].spool).exists()
