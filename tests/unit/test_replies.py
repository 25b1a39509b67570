"""The one table of replies (gateway/replies.py): wire text, enhanced codes, safe lines."""

from __future__ import annotations

import re

import pytest

from gateway import replies
from gateway.vocab import Action


def test_reply_wire_format() -> None:
    assert replies.SIZE_EXCEEDED.wire() == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    )
    multi = replies.Reply(250, "2.0.0", "a\nb")
    assert multi.wire() == b"250-2.0.0 a\r\n250 2.0.0 b\r\n"
    assert replies.SIZE_EXCEEDED.reason == "size_exceeded"
    r = replies.for_action(Action.REJECT, "relay.denied")
    assert (r.code, r.enhanced, r.reason) == (550, "5.7.1", "relay.denied")


def test_partial_refusal_names_five_refused_recipients_in_safe_lines() -> None:
    refused = [(f"u{i}@example.test", f"550 5.1.1 gone\x1b[{i}m" + "x" * 500) for i in range(7)]
    r = replies.partial_refusal(3, refused)
    assert (r.code, r.enhanced, r.reason) == (554, "5.3.0", "backend_partial_refused")
    lines = r.wire().split(b"\r\n")[:-1]
    assert lines[0] == b"554-5.3.0 Delivered to 3 of 10 recipients; the next hop refused:"
    for i, line in enumerate(lines[1:6]):
        assert line.startswith(b"554-5.3.0 <u%d@example.test> 550 5.1.1 gone?[" % i)
    assert all(len(x) <= 512 and x.isascii() and b"\x1b" not in x for x in lines)
    assert lines[6] == b"554 5.3.0 and 2 more"


def _every_reply() -> list[tuple[str, replies.Reply]]:
    """Every reply the gateway words itself: the module's and the policy's tables."""
    out = [(n, v) for n, v in vars(replies).items() if isinstance(v, replies.Reply)]
    for symbol, by_action in replies.SYMBOL_REPLIES.items():
        out += [(f"{symbol}/{action}", r) for action, r in by_action.items()]
    out += [(f"action/{a}", r) for a, r in replies.ACTION_REPLIES.items()]
    return out


# RFC 3463 2: class.subject.detail; class 2, 4 or 5; subject and detail 0-999 without
# leading zeros (3 digits at most); subjects defined are 0 to 7.
_ENHANCED = re.compile(r"([245])\.([0-7])\.(0|[1-9][0-9]{0,2})")


@pytest.mark.parametrize(("name", "reply"), _every_reply(), ids=lambda x: str(x)[:40])
def test_every_reply_has_an_enhanced_code_of_its_own_class(name: str, reply: replies.Reply) -> None:
    assert 200 <= reply.code <= 599
    if reply.code // 100 == 3:
        # RFC 2034: 354 is intermediate, without an enhanced code.
        assert reply.enhanced == ""
        return
    m = _ENHANCED.fullmatch(reply.enhanced)
    assert m is not None, reply.enhanced
    assert m.group(1) == str(reply.code)[0]  # 5.x.x only with 5yz, and so on


@pytest.mark.parametrize(("name", "reply"), _every_reply(), ids=lambda x: str(x)[:40])
def test_every_reply_is_one_short_line_of_reply_text(name: str, reply: replies.Reply) -> None:
    text = reply.text.replace("{detail}", "x" * 200)
    for line in reply.wire().split(b"\r\n")[:-1]:
        assert len(line) + 2 <= 512 and line.isascii()
    assert all(c == "\t" or " " <= c <= "~" for c in text.replace("\n", "")), name


def test_the_policys_replies_refuse_as_their_action_says() -> None:
    """A reject is a 5xx and a tempfail a 4xx, for every symbol's wording."""
    for symbol, by_action in replies.SYMBOL_REPLIES.items():
        for action, r in by_action.items():
            assert action in (Action.REJECT, Action.TEMPFAIL), symbol
            assert r.code // 100 == (5 if action is Action.REJECT else 4), (symbol, action)


def test_every_worded_symbol_is_one_a_check_can_emit() -> None:
    """A wording for a symbol no check emits is dead text (a typo in a symbol's name)."""
    from gateway.checks.registry import all_known_symbols

    assert set(replies.SYMBOL_REPLIES) - all_known_symbols() == set()


def test_each_reply_of_the_module_has_its_name_as_its_reason() -> None:
    assert replies.NEED_HELO.reason == "need_helo"
    named = [(n, v) for n, v in vars(replies).items() if isinstance(v, replies.Reply)]
    assert all(v.reason == n.lower() for n, v in named)


def test_a_detail_cannot_break_the_reply_line() -> None:
    r = replies.for_action(Action.REJECT, "dnsbl.listed", "zone.test\r\n250 OK\x00" + "y" * 999)
    assert r.code == 554 and r.reason == "dnsbl.listed"
    [line] = r.wire().split(b"\r\n")[:-1]
    assert b"\r" not in line[:-1] and b"\x00" not in line and len(line) < 512
    assert b"zone.test??250 OK?" in line
    default = replies.for_action(Action.TEMPFAIL, "dnsbl.listed")
    assert default.text.endswith("listed at a block list")


def test_an_unworded_symbol_gets_the_actions_generic_reply() -> None:
    r = replies.for_action(Action.TEMPFAIL, "spf.neutral")
    assert (r.code, r.enhanced, r.reason) == (451, "4.7.1", "spf.neutral")
    assert r.text == replies.ACTION_REPLIES[Action.TEMPFAIL].text


def test_a_backends_421_goes_on_as_451_and_its_text_is_made_safe() -> None:
    r = replies.from_backend(421, ["4.3.2 closing\x1b[2J", "second"])
    assert r.code == 451 and r.reason == "backend"
    assert r.wire() == b"451-4.3.2 closing?[2J\r\n451 second\r\n"
    assert replies.from_backend(550, ["5.1.1 unknown"]).code == 550
    assert replies.backend_wire(421, ("4.3.2 bye",)) == b"451 4.3.2 bye\r\n"
