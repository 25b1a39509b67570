"""The SMTP protocol without I/O (gateway/smtp/protocol.py): no socket, no loop."""

from __future__ import annotations

import pytest

from gateway import replies
from gateway.address import Address
from gateway.replies import Reply
from gateway.smtp import protocol, session
from gateway.smtp.protocol import Command, MailParams, Phase


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"MAIL FROM:<a@b.test> SIZE=10", Command(b"MAIL", "FROM:<a@b.test> SIZE=10")),
        (b"mail from:<a@b.test>", Command(b"MAIL", "from:<a@b.test>")),
        (b"NOOP", Command(b"NOOP", "")),
        (b"EHLO  client.test  ", Command(b"EHLO", "client.test")),
        (b"STARTTLS", Command(b"STARTTLS", "")),
        (b"xclient NAME=x", Command(b"XCLIENT", "NAME=x")),
        (b"MAILX", Command(b"MAILX", "")),  # unknown: the session answers 500
        (b"HELO caf\xc3\xa9.test", Command(b"HELO", "caf\u00e9.test")),
        (b"HELO \xff", Command(b"HELO", "\udcff")),  # not UTF-8: kept, never guessed
        (b"NOOP\x00", replies.CONTROL_CHARS),
        (b"RCPT TO:<a@b>\x1b[2J", replies.CONTROL_CHARS),
        (b"HELO a\rb", replies.CONTROL_CHARS),
        (b"HELO a\x7f", replies.CONTROL_CHARS),
        (b"HELO a\tb", Command(b"HELO", "a\tb")),  # TAB is white space, not control
    ],
)
def test_parse_line(line: bytes, expected: Command | Reply) -> None:
    assert protocol.parse_line(line) == expected


def test_the_session_answers_exactly_the_verbs_of_the_protocol() -> None:
    assert set(session._COMMANDS) == protocol.VERBS
    assert protocol.LAST_IN_GROUP - {b"TURN"} <= protocol.VERBS


A = Address("a", "b.test")

# The whole state table: (phase, verb) -> reply, None where the phase takes the verb.
TABLE = {
    (Phase.CONNECTED, b"MAIL"): replies.NEED_HELO,
    (Phase.GREETED, b"MAIL"): None,
    (Phase.MAIL, b"MAIL"): replies.NESTED_MAIL,
    (Phase.RCPT, b"MAIL"): replies.NESTED_MAIL,
    (Phase.CONNECTED, b"RCPT"): replies.NEED_MAIL,
    (Phase.GREETED, b"RCPT"): replies.NEED_MAIL,
    (Phase.MAIL, b"RCPT"): None,
    (Phase.RCPT, b"RCPT"): None,
    (Phase.CONNECTED, b"DATA"): replies.NEED_MAIL,
    (Phase.GREETED, b"DATA"): replies.NEED_MAIL,
    (Phase.MAIL, b"DATA"): replies.NEED_RCPT,
    (Phase.RCPT, b"DATA"): None,
}


@pytest.mark.parametrize(("phase", "verb"), sorted(TABLE))
def test_state_table(phase: Phase, verb: bytes) -> None:
    assert protocol.out_of_sequence(phase, verb) == TABLE[(phase, verb)]


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("verb", sorted(protocol.VERBS - {b"MAIL", b"RCPT", b"DATA"}))
def test_other_commands_are_taken_in_every_phase(phase: Phase, verb: bytes) -> None:
    assert protocol.out_of_sequence(phase, verb) is None


def test_phases_follow_the_session() -> None:
    assert protocol.phase_of(None, None, 0) is Phase.CONNECTED
    assert protocol.phase_of("c.test", None, 0) is Phase.GREETED
    assert protocol.phase_of("c.test", A, 0) is Phase.MAIL
    assert protocol.phase_of("c.test", A, 2) is Phase.RCPT


@pytest.mark.parametrize(
    ("text", "sender", "utf8", "expected"),
    [
        ("<a@b.test>", True, False, (A, {})),
        ("<a@b.test> size=10 BODY=8BITMIME", True, False, (A, {"SIZE": "10", "BODY": "8BITMIME"})),
        ("<a@b.test> RET", True, False, (A, {"RET": None})),
        ("<>", True, False, (Address("", ""), {})),
        ("<>", False, False, replies.BAD_ADDRESS),
        ("<Postmaster>", False, False, (Address("postmaster", ""), {})),
        ("<a@b.test>SIZE=1", True, False, replies.BAD_SENDER_ADDRESS),
        ("<a@b.test> SIZE=1 size=2", True, False, replies.PARAM_DUPLICATE),
        ("<a@b.test> =1", True, False, replies.SYNTAX_ARGS),
        ("a@b.test", False, False, replies.BAD_ADDRESS),
        ("<j\u00f6@b.test>", True, False, replies.SMTPUTF8_REQUIRED),
        ("<j\u00f6@b.test>", False, False, replies.SMTPUTF8_REQUIRED),
        ("<a@\uff42.test>", False, True, replies.BAD_DOMAIN_SPELLING),  # full-width b
    ],
)
def test_path_and_params(
    text: str, sender: bool, utf8: bool, expected: tuple[Address, dict[str, str]] | Reply
) -> None:
    assert protocol.path_and_params(text, sender=sender, utf8_mail=utf8) == expected


def test_a_recipient_of_an_smtputf8_transaction_may_be_utf8() -> None:
    parsed = protocol.path_and_params("<j\u00f6@b.test>", sender=False, utf8_mail=True)
    assert not isinstance(parsed, Reply) and parsed[0].utf8


@pytest.mark.parametrize(
    ("params", "tls", "requiretls", "expected"),
    [
        ({}, False, False, MailParams(0, [], False)),
        ({"SIZE": "1000"}, False, False, MailParams(1000, ["SIZE=1000"], False)),
        ({"SIZE": "2000000"}, False, False, replies.SIZE_EXCEEDED),
        ({"SIZE": "\u00b2"}, False, False, replies.SYNTAX_ARGS),  # str.isdigit() says yes
        ({"SIZE": "\u0661\u0662"}, False, False, replies.SYNTAX_ARGS),
        ({"SIZE": "1" * 21}, False, False, replies.SYNTAX_ARGS),
        ({"SIZE": None}, False, False, replies.SYNTAX_ARGS),
        ({"BODY": "8bitmime"}, False, False, MailParams(0, ["BODY=8BITMIME"], False)),
        ({"BODY": "BINARYMIME"}, False, False, replies.SYNTAX_ARGS),
        ({"SMTPUTF8": None}, False, False, MailParams(0, ["SMTPUTF8"], True)),
        ({"SMTPUTF8": "yes"}, False, False, replies.SYNTAX_ARGS),
        ({"REQUIRETLS": None}, False, True, replies.REQUIRETLS_NEEDS_TLS),
        ({"REQUIRETLS": None}, True, False, replies.REQUIRETLS_UNSUPPORTED),
        ({"REQUIRETLS": None}, True, True, MailParams(0, ["REQUIRETLS"], False)),
        (
            {"RET": "hdrs", "ENVID": "x+2By"},
            False,
            False,
            MailParams(0, ["RET=HDRS", "ENVID=x+2By"], False),
        ),
        ({"ENVID": "a+0D+0Ab"}, False, False, replies.DSN_SYNTAX),
        ({"AUTH": "<>"}, False, False, replies.PARAM_UNKNOWN),
    ],
)
def test_mail_parameters(
    params: dict[str, str | None], tls: bool, requiretls: bool, expected: MailParams | Reply
) -> None:
    got = protocol.mail_parameters(params, max_size=1_000_000, tls=tls, requiretls=requiretls)
    assert got == expected


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, []),
        ({"NOTIFY": "success,failure"}, ["NOTIFY=SUCCESS,FAILURE"]),
        ({"NOTIFY": "NEVER,SUCCESS"}, replies.DSN_SYNTAX),
        ({"ORCPT": "rfc822;a@b.test"}, ["ORCPT=rfc822;a@b.test"]),
        ({"ORCPT": "rfc822;a+0Db"}, replies.DSN_SYNTAX),
        ({"SIZE": "1"}, replies.PARAM_UNKNOWN),
    ],
)
def test_rcpt_parameters(params: dict[str, str | None], expected: list[str] | Reply) -> None:
    assert protocol.rcpt_parameters(params, utf8=False) == expected


# -- framing: bytes in, commands and messages out ----------------------------------


def commands_of(rx: protocol.Receiver, limit: int = 40) -> list[Command | Reply]:
    out: list[Command | Reply] = []
    while (event := rx.next_command(limit)) is not None:
        out.append(event)
    return out


def fed_in(chunks: list[bytes], limit: int = 40) -> list[Command | Reply]:
    """What a receiver gives for bytes arriving in these pieces."""
    rx = protocol.Receiver()
    out: list[Command | Reply] = []
    for chunk in chunks:
        rx.receive_data(chunk)
        out += commands_of(rx, limit)
    return out


SESSION = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nNOOP\nQUIT\r\n" + b"X" * 60 + b"\r\nRSET\r\n"
EXPECTED: list[Command | Reply] = [
    Command(b"EHLO", "c.test"),
    Command(b"MAIL", "FROM:<a@b.test>"),
    replies.CONTROL_CHARS,  # a bare LF stays inside its line, never ends it
    replies.LINE_TOO_LONG,
    Command(b"RSET", ""),
]


def test_commands_are_framed_the_same_however_the_bytes_arrive() -> None:
    assert fed_in([SESSION]) == EXPECTED
    assert fed_in([SESSION[i : i + 1] for i in range(len(SESSION))]) == EXPECTED
    for cut in range(1, len(SESSION)):
        assert fed_in([SESSION[:cut], SESSION[cut:]]) == EXPECTED, cut


def test_a_line_too_long_is_never_held_whole() -> None:
    rx = protocol.Receiver()
    for _ in range(1000):
        rx.receive_data(b"A" * 100)
        assert rx.next_command(40) is None
        assert len(rx.buf) <= 41  # dropped as it arrives
    rx.receive_data(b"\r")
    assert rx.next_command(40) is None
    assert rx.buf == b"\r"  # the CR that may start the CRLF is kept
    rx.receive_data(b"\nNOOP\r\n")
    assert commands_of(rx) == [replies.LINE_TOO_LONG, Command(b"NOOP", "")]


def test_a_line_at_the_limit_is_a_command() -> None:
    line = b"HELO " + b"h" * 35
    assert len(line) == 40
    assert fed_in([line + b"\r\n"]) == [Command(b"HELO", "h" * 35)]
    assert fed_in([line + b"h\r\n"]) == [replies.LINE_TOO_LONG]


def message_in(chunks: list[bytes], max_size: int = 1000) -> tuple[bytes | int, bytes]:
    """The content a receiver frames from these pieces, and what it leaves after it."""
    rx = protocol.Receiver()
    rx.start_message(max_size)
    got: bytes | int | None = None
    for chunk in chunks:
        rx.receive_data(chunk)
        if got is None:
            got = rx.next_message()
    assert got is not None, "no end of data"
    return got, bytes(rx.buf)


BODY = b"Subject: x\r\n\r\n..leading dot\r\nbare\n.\nLF\r\nlast\r\n.\r\nQUIT\r\n"


def test_a_message_is_framed_the_same_however_the_bytes_arrive() -> None:
    want = (BODY[: BODY.index(b".\r\nQUIT")], b"QUIT\r\n")
    assert message_in([BODY]) == want
    assert message_in([BODY[i : i + 1] for i in range(len(BODY))]) == want
    for cut in range(1, len(BODY)):
        assert message_in([BODY[:cut], BODY[cut:]]) == want, cut


def test_only_crlf_dot_crlf_ends_a_message() -> None:
    content, rest = message_in([b"a\n.\nb\r.\rc\r\n.\nd\r\n.\r\n"])
    assert content == b"a\n.\nb\r.\rc\r\n.\nd\r\n"
    assert rest == b""


def test_the_empty_message() -> None:
    assert message_in([b".", b"\r", b"\nNOOP\r\n"]) == (b"", b"NOOP\r\n")
    assert message_in([b"\r\n.\r\n"]) == (b"\r\n", b"")  # one empty line
    assert message_in([b"..\r\n.\r\n"]) == (b"..\r\n", b"")  # one line: a dot


def test_a_message_too_big_is_discarded_as_it_arrives_and_measured() -> None:
    rx = protocol.Receiver()
    rx.start_message(100)
    for _ in range(500):
        rx.receive_data(b"y" * 99 + b"\r")
        assert rx.next_message() is None
        assert len(rx.buf) <= 104
    rx.receive_data(b"\n.\r\nNOOP\r\n")
    assert rx.next_message() == 500 * 100 - 1  # every byte before the final CRLF.CRLF
    assert commands_of(rx) == [Command(b"NOOP", "")]


def test_no_room_discards_the_message_and_room_is_not_asked_again() -> None:
    asked: list[int] = []

    def room(n: int) -> bool:
        asked.append(n)
        return n < 30

    rx = protocol.Receiver()
    rx.start_message(1000, room)
    for _ in range(5):
        rx.receive_data(b"z" * 10)
        assert rx.next_message() is None
    rx.receive_data(b"\r\n.\r\n")
    assert rx.next_message() == 50  # discarded, its length still told
    assert asked == [10, 20, 30]  # once refused, never asked to hold more


def test_a_message_at_the_size_limit_is_kept() -> None:
    assert message_in([b"x" * 98 + b"\r\n.\r\n"], max_size=98) == (b"x" * 98 + b"\r\n", b"")
    assert message_in([b"x" * 99 + b"\r\n.\r\n"], max_size=98) == (99, b"")
