"""The backend's side of a transaction (forward/relay.py) against a scripted
backend: alias fan-out, reopening, and LMTP's replies merged."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway import replies
from gateway.address import Address, parse_path
from gateway.forward import relay
from gateway.forward.backend import ClientInfo, Transaction
from gateway.forward.client import BackendError, SmtpReply

OK = SmtpReply(250, ["2.1.5 Ok"])
UNKNOWN = SmtpReply(550, ["5.1.1 User unknown"])
FULL = SmtpReply(452, ["4.2.2 Mailbox full"])


def a(s: str) -> Address:
    return parse_path(f"<{s}>")


class Scripted:
    """A backend transaction answering RCPT from a table (250 by default)."""

    def __init__(self, answers: dict[str, SmtpReply | BackendError] | None = None) -> None:
        self.answers = answers or {}
        self.asked: list[tuple[str, list[str]]] = []
        self.aborted = False

    async def rcpt(self, rcpt: str, params: list[str]) -> SmtpReply:
        self.asked.append((rcpt, params))
        ans = self.answers.get(rcpt, OK)
        if isinstance(ans, BackendError):
            raise ans
        return ans

    async def data(self, wire: bytes, recipients: int, prefix: bytes = b"") -> list[SmtpReply]:
        return [OK]

    async def finish(self) -> None:
        pass

    async def abort(self) -> None:
        self.aborted = True


def fan(
    txn: Scripted,
    original: str,
    targets: Sequence[str],
    params: list[str] | None = None,
    held: list[Address] | None = None,
    limit: int = 100,
) -> tuple[relay.FanOut, list[Address], dict[Address, list[str]]]:
    held = [] if held is None else held
    held_params: dict[Address, list[str]] = {}
    out = asyncio.run(
        relay.fan_out(
            txn,
            a(original),
            [a(t) for t in targets],
            params or [],
            held=held,
            held_params=held_params,
            max_recipients=limit,
        )
    )
    return out, held, held_params


def test_a_single_recipient_gets_the_backends_own_reply_and_no_orcpt() -> None:
    txn = Scripted({"x@b.test": UNKNOWN})
    out, held, _ = fan(txn, "x@b.test", ["x@b.test"])
    assert (
        out.reply is UNKNOWN and held == [] and out.refused == ["<x@b.test> 550 5.1.1 User unknown"]
    )
    assert txn.asked == [("x@b.test", [])]


def test_an_alias_carries_orcpt_and_is_accepted_if_any_member_accepts() -> None:
    txn = Scripted({"m2@b.test": UNKNOWN})
    out, held, params = fan(txn, "list@b.test", ["m1@b.test", "m2@b.test"], ["NOTIFY=NEVER"])
    assert out.reply is replies.ALIAS_ACCEPTED and out.alias_accepted
    assert held == [a("m1@b.test")]
    assert params == {a("m1@b.test"): ["NOTIFY=NEVER", "ORCPT=rfc822;list@b.test"]}
    assert [p for _, p in txn.asked] == [["NOTIFY=NEVER", "ORCPT=rfc822;list@b.test"]] * 2
    # The client's own ORCPT is kept, not doubled.
    txn = Scripted()
    fan(txn, "list@b.test", ["m1@b.test", "m2@b.test"], ["ORCPT=rfc822;c@c.test"])
    assert txn.asked[0][1] == ["ORCPT=rfc822;c@c.test"]


def test_any_member_deferring_defers_the_whole_alias() -> None:
    out, held, _ = fan(Scripted({"m2@b.test": FULL}), "l@b.test", ["m1@b.test", "m2@b.test"])
    assert out.reply is FULL
    assert held == [a("m1@b.test")]  # held at the backend; the client will retry all


def test_an_alias_every_member_of_which_is_refused_gets_the_first_refusal() -> None:
    txn = Scripted({"m1@b.test": UNKNOWN, "m2@b.test": SmtpReply(550, ["5.7.1 no"])})
    out, held, _ = fan(txn, "l@b.test", ["m1@b.test", "m2@b.test"])
    assert out.reply is UNKNOWN and held == []


def test_members_already_held_are_not_asked_again() -> None:
    txn = Scripted()
    out, held, _ = fan(txn, "l@b.test", ["m1@b.test", "m2@b.test"], held=[a("m1@b.test")])
    assert [r for r, _ in txn.asked] == ["m2@b.test"]
    assert held == [a("m1@b.test"), a("m2@b.test")] and out.reply is replies.ALIAS_ACCEPTED


def test_the_recipient_limit_counts_backend_recipients() -> None:
    txn = Scripted()
    out, held, _ = fan(txn, "l@b.test", ["m1@b.test", "m2@b.test", "m3@b.test"], limit=2)
    assert out.over_limit and out.reply is replies.TOO_MANY_RECIPIENTS
    assert len(held) == 2 and len(txn.asked) == 2


def test_a_lost_backend_is_reported_not_replied() -> None:
    out, held, _ = fan(Scripted({"m2@b.test": BackendError("gone")}), "l@b.test",
                       ["m1@b.test", "m2@b.test"])  # fmt: skip
    assert out.reply is None and isinstance(out.error, BackendError) and held == [a("m1@b.test")]


class Link:
    def __init__(self, mail: SmtpReply, txn: Scripted) -> None:
        self.mail, self.txn = mail, txn
        self.begun: list[tuple[str, list[str]]] = []

    async def begin(
        self, client: ClientInfo, sender: str, params: list[str]
    ) -> tuple[SmtpReply, Transaction | None]:
        self.begun.append((sender, params))
        return self.mail, (self.txn if self.mail.ok else None)

    async def end(self) -> None:
        pass


INFO = ClientInfo("192.0.2.1", 1, "c.test", True, False)


def test_reopen_replays_recipients_with_their_parameters() -> None:
    old, new = Scripted(), Scripted()
    link = Link(SmtpReply(250, ["2.1.0 Ok"]), new)
    rcpts = [a("x@b.test"), a("y@b.test")]
    got = asyncio.run(relay.reopen(link, old, INFO, a("srs@b.test"), ["BODY=8BITMIME"], rcpts,
                                   {a("y@b.test"): ["NOTIFY=NEVER"]}))  # fmt: skip
    assert got is new and old.aborted
    assert link.begun == [("srs@b.test", ["BODY=8BITMIME"])]
    assert new.asked == [("x@b.test", []), ("y@b.test", ["NOTIFY=NEVER"])]


def test_reopen_says_why_it_failed() -> None:
    link = Link(SmtpReply(451, ["4.3.0 busy"]), Scripted())
    got = asyncio.run(relay.reopen(link, None, INFO, a("s@b.test"), [], [], {}))
    assert got == "MAIL: 451 4.3.0 busy"
    refusing = Scripted({"x@b.test": UNKNOWN})
    link = Link(SmtpReply(250, ["2.1.0 Ok"]), refusing)
    got = asyncio.run(relay.reopen(link, None, INFO, a("s@b.test"), [], [a("x@b.test")], {}))
    assert got == "RCPT x@b.test: 550 5.1.1 User unknown" and refusing.aborted


def test_lmtp_replies_merge_into_one() -> None:
    rcpts = [a("x@b.test"), a("y@b.test")]
    delivered = SmtpReply(250, ["2.0.0 Ok"])
    assert relay.combine_lmtp([delivered, delivered], rcpts) is delivered
    assert relay.combine_lmtp([delivered, FULL], rcpts) is replies.BACKEND_PARTIAL
    merged = relay.combine_lmtp([delivered, UNKNOWN], rcpts)
    assert isinstance(merged, replies.Reply)
    assert (merged.code, merged.enhanced) == (554, "5.3.0")
    assert merged.text.splitlines() == [
        "Delivered to 1 of 2 recipients; the next hop refused:",
        "<y@b.test> 550 5.1.1 User unknown",
    ]
