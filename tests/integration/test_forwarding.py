"""Pass-through to a real backend process: envelopes, replies, failures."""

from __future__ import annotations

import smtplib
from collections.abc import Callable

import pytest

from tests.security.helpers import greeted
from tests.support.procs import Backend, Gateway, base_config, free_port
from tests.support.smtp import RawClient

MSG = b"From: a@sender.test\r\nTo: x@example.test\r\nSubject: hi\r\n\r\nbody line\r\n"


@pytest.mark.parametrize("defer_mail", [True, False])
def test_two_local_recipients_arrive_with_same_envelope_and_received(
    backend: Backend, gateway_factory: Callable[..., Gateway], defer_mail: bool
) -> None:
    """Deferred (the default), MAIL goes to the backend with the first RCPT, and the
    client's MAIL is answered by the gateway; otherwise the backend's answer is relayed."""
    gw = gateway_factory(base_config(backend.url, backend={"defer_mail": defer_mail}))
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        sent = len(backend.commands())
        mail_reply = "250 2.1.0 Sender OK" if defer_mail else "250 2.1.0 backend sender ok"
        assert c.cmd("MAIL FROM:<a@sender.test>") == (250, mail_reply)
        # Not yet at the backend when deferred; already there when not.
        at_backend = [x for x in backend.commands()[sent:] if x.startswith("MAIL ")]
        assert bool(at_backend) is not defer_mail
        assert c.cmd("RCPT TO:<x@example.test>") == (
            250,
            "250 2.1.5 backend accepted <x@example.test>",
        )
        assert c.cmd("RCPT TO:<y@sub.corp.test>")[1].startswith("250 2.1.5 backend accepted")
        assert c.cmd("DATA")[0] == 354
        c.send(MSG + b".\r\n")
        assert c.reply() == (250, "250 2.0.0 backend queued as B1")
        c.cmd("QUIT")
    [m] = backend.messages()
    assert m["mail_from"] == "a@sender.test"
    assert m["rcpt_tos"] == ["x@example.test", "y@sub.corp.test"]
    data: bytes = m["data"]
    assert data.startswith(
        b"Received: from client.test ([127.0.0.1])\r\n\tby gw.test (smtp-gateway)"
    )
    assert data.endswith(MSG)
    # Exactly one header was added in front of the client's bytes.
    head = data[: -len(MSG)]
    assert head.count(b"Received:") == 1
    # The session id in the Received header is the one in the transaction log line.
    ev = gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("outcome") == "delivered")
    assert f"id {ev['session']}".encode() in head
    assert ev["rcpts"] == 2 and ev["size"] == len(MSG)


def test_postmaster_without_a_domain_is_accepted_and_relayed_as_is(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """RFC 5321 4.5.1: RCPT TO:<Postmaster>, with no domain, MUST be accepted. It is
    local whatever local_domains says, and goes to the backend as <postmaster>."""
    gw = gateway_factory(base_config(backend.url))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<Postmaster>") == (250, "250 2.1.5 backend accepted <postmaster>")
        assert c.cmd("RCPT TO:<postmaster@remote.test>")[0] == 550  # still not a relay
        assert c.cmd("DATA")[0] == 354
        c.send(MSG + b".\r\n")
        assert c.reply()[0] == 250
    [m] = backend.messages()
    assert m["rcpt_tos"] == ["postmaster"]
    assert "RCPT postmaster" in backend.commands()


def test_backend_rejects_one_recipient_other_delivered(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    be = backend_factory("--reject-rcpt", "nobody@example.test")
    gw = gateway_factory(base_config(be.url))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        code, msg = s.rcpt("nobody@example.test")
        assert (code, msg) == (550, b"5.1.1 <nobody@example.test>: backend says user unknown")
        assert s.rcpt("x@example.test")[0] == 250
        code, msg = s.data(MSG)
        assert code == 250
    [m] = be.messages()
    assert m["rcpt_tos"] == ["x@example.test"]


def test_backend_down_at_mail_gives_451(gateway_factory: Callable[..., Gateway]) -> None:
    bcfg = {"defer_mail": False}
    gw = gateway_factory(base_config(f"smtp://127.0.0.1:{free_port()}", backend=bcfg))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        code, msg = s.mail("a@sender.test")
        assert code == 451 and msg.startswith(b"4.4.1")
        assert s.rcpt("x@example.test")[0] == 503  # no transaction was opened


def test_backend_down_with_deferred_mail_gives_451_at_rcpt_then_at_mail(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """Deferred MAIL: the first RCPT finds the backend down (451 4.4.1) and nothing
    of the transaction is accepted; once the circuit breaker has opened, the next
    transaction hears it at MAIL already."""
    bcfg = {"circuit_breaker": {"failures": 1, "cooldown": 60}}
    gw = gateway_factory(base_config(f"smtp://127.0.0.1:{free_port()}", backend=bcfg))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        assert s.mail("a@sender.test")[0] == 250
        code, msg = s.rcpt("x@example.test")
        assert code == 451 and msg.startswith(b"4.4.1"), (code, msg)
        assert s.rcpt("y@example.test")[0] == 451  # the transaction stays deferred
        assert s.docmd("DATA")[0] == 451
        s.rset()
        code, msg = s.mail("a@sender.test")
        assert code == 451 and msg.startswith(b"4.4.1"), (code, msg)
    gw.wait_log(lambda e: e.get("event") == "backend_error" and "refused" in e.get("error", ""))


def test_backend_drops_mid_data_gives_4xx_and_nothing_stored(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    be = backend_factory("--drop-in-data")
    gw = gateway_factory(base_config(be.url))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        code, msg = s.data(MSG)
        assert 400 <= code < 500, (code, msg)
        assert msg.startswith(b"4.4.2")
    assert be.messages() == []
    assert "DATA" in be.commands()  # the backend really was mid-DATA


def test_a_looping_message_is_refused_at_the_hop_limit(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """RFC 5321 6.3: past `limits.max_received_headers` Received fields (default 100)
    the message is in a loop: 554 5.4.6, the backend sees nothing of it, and the
    session goes on. A message at the limit still passes, gaining our own field."""
    gw = gateway_factory(base_config(backend.url))
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; x\r\n" % (i, i) for i in range(99))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(b"received: from lower.test\r\n" + hops + MSG)[0] == 250  # 100: at the limit
        [looped] = [m["data"] for m in backend.messages()]
        fields = [line for line in looped.split(b"\r\n") if line.lower().startswith(b"received:")]
        assert len(fields) == 101  # the client's 100 and ours
        # The same message comes round again (say, the backend routes it back to us).
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(looped) == (554, b"5.4.6 Too many hops (Received header fields): mail loop?")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(hops + MSG)[0] == 250
    assert len(backend.messages()) == 2
    gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("reason") == "mail_loop")


def test_a_header_section_over_the_limit_is_refused(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """`limits.max_header_size` bytes of header fields (the empty line after them not
    counted): a message with more gets 552 5.3.4 once its DATA is read, the backend
    sees nothing of it, and the session goes on. Header fields of exactly the limit
    pass, and so does a body of any size under `max_message_size`."""
    gw = gateway_factory(base_config(backend.url, limits={"max_header_size": 4096}))
    head = b"From: a@sender.test\r\nTo: x@example.test\r\n"
    pad = b"X-Pad: " + b"p" * 91 + b"\r\n"  # 100 bytes: lines the backend takes
    filler = 4096 - len(head) - 40 * len(pad) - len(b"X-Pad: \r\n")
    at_limit = head + 40 * pad + b"X-Pad: " + b"p" * filler + b"\r\n"
    assert len(at_limit) == 4096
    body = b"\r\n" + b"body line\r\n" * 2000  # 22 KB of body: not counted
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        for message, expected in (
            (at_limit + body, 250),
            (at_limit[:-2] + b"p\r\n" + body, 552),  # one byte over
            (at_limit + b"X-No-Body: the section never ends\r\n", 552),
            (MSG, 250),
        ):
            s.mail("a@sender.test")
            s.rcpt("x@example.test")
            code, text = s.data(message)
            assert code == expected, (code, text)
            if code == 552:
                assert text == b"5.3.4 Message header size exceeds fixed maximum size"
    delivered = [m["data"] for m in backend.messages()]
    assert len(delivered) == 2 and delivered[0].endswith(body)
    gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("reason") == "header_too_big")


def _txn(c: RawClient, mail: str, rcpts: list[str], message: bytes) -> list[tuple[int, str]]:
    """One transaction on an open session: the replies to MAIL, each RCPT and DATA
    (and to the message, when DATA was accepted)."""
    out = [c.cmd(mail.encode())]
    out += [c.cmd(r.encode()) for r in rcpts]
    out.append(c.cmd("DATA"))
    if out[-1][0] == 354:
        c.send(message + b".\r\n")
        out.append(c.reply())
    return out


@pytest.mark.parametrize(("defer_mail", "pipelining"), [(True, True), (True, False), (False, True)])
def test_backend_refusal_of_the_sender(
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
    defer_mail: bool,
    pipelining: bool,
) -> None:
    """Deferred, MAIL goes out with each RCPT until the backend takes it (in one write
    when it offers PIPELINING), and its refusal of the sender, verbatim, is the
    answer to that RCPT; not deferred, it is the answer to MAIL. Either way the
    pooled backend session stays in step for the next transaction."""
    flags = ["--reject-mail", "spam@sender.test"] + (["--pipelining"] if pipelining else [])
    be = backend_factory(*flags)
    gw = gateway_factory(base_config(be.url, backend={"defer_mail": defer_mail}))
    refusal = "553 5.7.1 <spam@sender.test>: backend refuses this sender"
    rcpts = ["RCPT TO:<x@example.test>", "RCPT TO:<y@example.test>"]
    with greeted(gw.port()) as c:
        refused = _txn(c, "MAIL FROM:<spam@sender.test>", rcpts, MSG)
        if defer_mail:
            assert refused == [(250, "250 2.1.0 Sender OK"), (553, refusal), (553, refusal),
                               (554, "554 5.5.1 Error: no valid recipients")]  # fmt: skip
            assert c.cmd("RSET")[0] == 250
        else:
            assert refused[0] == (553, refusal)
            assert [code for code, _ in refused[1:]] == [503, 503, 503], refused
        ok = _txn(c, "MAIL FROM:<a@sender.test>", rcpts[:1], MSG)
        assert [code for code, _ in ok] == [250, 250, 354, 250], ok
    tried = [x for x in be.commands() if x.startswith("MAIL spam@")]
    assert len(tried) == (2 if defer_mail else 1)
    [m] = be.messages()
    assert (m["mail_from"], m["rcpt_tos"]) == ("a@sender.test", ["x@example.test"])


def test_the_backends_size_is_learned_at_start_advertised_and_enforced(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """A backend's size refusal must not answer RCPT: a 552 there reads as "too many
    recipients", which RFC 5321 4.5.3.1.10 tells clients to retry. The gateway greets
    the backend at start, advertises the smaller SIZE of the two, refuses a larger
    declared size at MAIL, and a larger message at its end, without the backend
    seeing either. What it advertises leaves room under the backend's SIZE for the
    header fields it adds (app.PREFIX_ROOM)."""
    from gateway.app import PREFIX_ROOM

    be = backend_factory("--size-limit", str(10000 + PREFIX_ROOM))
    gw = gateway_factory(base_config(be.url))
    gw.wait_log(lambda e: e.get("event") == "backend_size" and e["max_message_size"] == 10000)
    rcpt = ["RCPT TO:<x@example.test>"]
    too_big = "552 5.3.4 Message size exceeds fixed maximum message size"
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        code, text = c.cmd("EHLO client.test")
        assert code == 250 and "250-SIZE 10000" in text.splitlines()
        assert c.cmd("MAIL FROM:<a@sender.test> SIZE=20000") == (552, too_big)
        big = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n"
        over = _txn(c, "MAIL FROM:<a@sender.test>", rcpt, big * 200)
        assert over[-1] == (552, too_big), over
        ok = _txn(c, "MAIL FROM:<a@sender.test> SIZE=9000", rcpt, MSG)
        assert [code for code, _ in ok] == [250, 250, 354, 250], ok
    assert [x for x in be.commands() if x.startswith("MAIL")] == [
        "MAIL a@sender.test ",
        "MAIL a@sender.test SIZE=9000",
    ]
    assert len(be.messages()) == 1


def test_smtputf8_mail_to_a_backend_without_it_passes_when_it_is_ascii(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """Senders set SMTPUTF8 on plain ASCII mail too. A backend without SMTPUTF8
    (Exchange, older Dovecot LMTP) would refuse the parameter; the gateway drops it
    and refuses only what really needs it: a UTF-8 address (553 5.6.7) or UTF-8
    header fields (554 5.6.9), which the backend never sees."""
    be = backend_factory("--no-smtputf8")
    gw = gateway_factory(base_config(be.url))
    utf8_subject = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    with greeted(gw.port()) as c:
        mail = "MAIL FROM:<a@sender.test> SMTPUTF8"
        rcpt_utf8 = "RCPT TO:<jörg@example.test>"
        first = _txn(c, mail, ["RCPT TO:<x@example.test>", rcpt_utf8], MSG)
        assert [code for code, _ in first] == [250, 250, 553, 354, 250], first
        assert first[2][1].startswith("553 5.6.7 ")
        second = _txn(c, mail, ["RCPT TO:<x@example.test>"], utf8_subject)
        assert [code for code, _ in second] == [250, 250, 354, 554], second
        assert second[3][1].startswith("554 5.6.9 ")
        # A UTF-8 sender: refused where MAIL reaches the backend, with the first RCPT.
        third = _txn(c, "MAIL FROM:<jörg@sender.test> SMTPUTF8", ["RCPT TO:<x@example.test>"], b"")
        assert [code for code, _ in third] == [250, 553, 554], third
        assert third[1][1].startswith("553 5.6.7 "), third
        assert c.cmd("RSET")[0] == 250  # its MAIL was accepted: the transaction is open
        # The session and the pooled backend session are clean: the next one passes.
        assert _txn(c, mail, ["RCPT TO:<y@example.test>"], MSG)[-1][0] == 250
    [m1, m2] = be.messages()
    assert m1["rcpt_tos"] == ["x@example.test"] and m2["rcpt_tos"] == ["y@example.test"]
    assert "SMTPUTF8" not in m1["mail_options"]
    assert all(line.isascii() for line in be.commands())  # no UTF-8 reached it at all


def test_utf8_domains_reach_a_backend_without_smtputf8_as_a_labels(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """An internationalised domain has an ASCII spelling (RFC 5890 A-labels) that
    names the same domain, so only a UTF-8 local part needs SMTPUTF8 at the backend.
    Relay control knows the domain by either spelling; IDNA 2008 keeps ß (IDNA
    2003 would have mapped it to ss, another domain)."""
    be = backend_factory("--no-smtputf8")
    cfg = base_config(be.url, local_domains=["bücher.example", "straße.example"])
    gw = gateway_factory(cfg)
    rcpts = [
        "RCPT TO:<x@Bücher.example>",  # sent with MAIL (deferred)
        "RCPT TO:<y@xn--bcher-kva.example>",
        "RCPT TO:<z@straße.example>",
        "RCPT TO:<jörg@bücher.example>",  # no ASCII form
    ]
    with greeted(gw.port()) as c:
        got = _txn(c, "MAIL FROM:<a@sender.bücher.example> SMTPUTF8", rcpts, MSG)
    assert [code for code, _ in got] == [250, 250, 250, 250, 553, 354, 250], got
    [m] = be.messages()
    assert m["mail_from"] == "a@sender.xn--bcher-kva.example"
    assert m["rcpt_tos"] == [
        "x@xn--bcher-kva.example",
        "y@xn--bcher-kva.example",
        "z@xn--strae-oqa.example",
    ]
    assert all(line.isascii() for line in be.commands())


def test_smtputf8_mail_to_a_backend_with_it_is_passed_as_is(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    with greeted(gw.port()) as c:
        msg = "Subject: Grüße\r\n\r\nbody\r\n".encode()
        replies = _txn(
            c, "MAIL FROM:<jörg@sender.test> SMTPUTF8", ["RCPT TO:<jörg@example.test>"], msg
        )
        assert [code for code, _ in replies] == [250, 250, 354, 250], replies
    [m] = backend.messages()
    assert m["mail_from"] == "jörg@sender.test" and m["rcpt_tos"] == ["jörg@example.test"]
    assert "SMTPUTF8" in m["mail_options"] and m["data"].endswith(msg)
    assert b" (smtp-gateway) with UTF8SMTP id " in m["data"].split(b"\r\n", 2)[1]  # RFC 6531 3.7.3


def test_8bitmime_mail_to_a_backend_without_it_passes_when_it_is_7bit(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """RFC 6152 3: 8-bit content must not go to a server that does not offer 8BITMIME,
    and a relay that cannot convert it refuses it (554 5.6.3); 7-bit content declared
    BODY=8BITMIME still passes, without the parameter."""
    be = backend_factory("--no-8bitmime")
    gw = gateway_factory(base_config(be.url))
    eight_bit = "Subject: hi\r\n\r\ncafé\r\n".encode()
    mail = "MAIL FROM:<a@sender.test> BODY=8BITMIME"
    with greeted(gw.port()) as c:
        assert _txn(c, mail, ["RCPT TO:<x@example.test>"], MSG)[-1][0] == 250
        refused = _txn(c, mail, ["RCPT TO:<x@example.test>"], eight_bit)[-1]
        assert refused[0] == 554 and refused[1].startswith("554 5.6.3 "), refused
        assert _txn(c, mail, ["RCPT TO:<y@example.test>"], MSG)[-1][0] == 250
    [m1, m2] = be.messages()
    assert not any(o.upper().startswith("BODY") for o in m1["mail_options"])
    assert m2["rcpt_tos"] == ["y@example.test"]


def test_backend_451_at_end_of_data_is_relayed(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    be = backend_factory("--data-reply", "451 4.3.0 backend queue full")
    gw = gateway_factory(base_config(be.url))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(MSG) == (451, b"4.3.0 backend queue full")
        # The session is still usable and the next transaction goes through the same way.
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(MSG)[0] == 451
    assert be.messages() == []
    gw.wait_log(lambda e: e.get("event") == "transaction" and e.get("outcome") == "tempfailed")


def test_a_backend_421_reaches_the_client_as_451_and_the_session_stays_open(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """A 421 says "closing the channel" (RFC 5321 3.8). From the backend it is the
    backend's session that ends, not the client's with us: relayed as is, it would
    tell the client a lie (we keep reading) and make it drop the session."""
    be = backend_factory(
        "--shutdown-rcpt", "down@example.test", "--data-reply", "421 4.3.2 backend going down"
    )
    gw = gateway_factory(base_config(be.url))
    with greeted(gw.port()) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<down@example.test>") == (451, "451 4.3.2 backend shutting down")
        # That backend session is over, whether or not the backend has closed it yet.
        assert c.cmd("RCPT TO:<y@example.test>")[1].startswith("451 4.4.2 ")
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(MSG + b".\r\n")
        assert c.reply() == (451, "451 4.3.2 backend going down")
        assert c.cmd("NOOP")[0] == 250  # still our session
    assert be.messages() == []


def test_a_backend_reply_reaches_the_client_as_rfc_5321_reply_text(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """Control characters become `?` and a line over 512 octets is cut there."""
    text = "2.0.0 queued\x1b[31m\x7f\tas B1 " + "x" * 600
    be = backend_factory("--data-reply", f"250 {text}")
    gw = gateway_factory(base_config(be.url))
    with greeted(gw.port()) as c:
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<x@example.test>")
        c.cmd("DATA")
        c.send(MSG + b".\r\n")
        code, line = c.reply()
    assert code == 250
    assert line == ("250 2.0.0 queued?[31m?\tas B1 " + "x" * 600)[:510]


def test_a_backend_reply_one_behind_never_becomes_a_250_for_the_message(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """A backend that sends a reply nobody asked for (here after MAIL) puts every later
    reply one behind its command: read on, RCPT y's 250 would have answered DATA and
    been relayed as the message's acceptance, for a message the backend never saw.
    Unread bytes before a command, or a reply of the wrong class, end that session:
    which of the two notices it first depends on when the backend's replies arrive,
    but it is by DATA at the latest."""
    be = backend_factory("--lenient", "--extra-reply-after", "MAIL")
    gw = gateway_factory(base_config(be.url))
    with greeted(gw.port()) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        # RCPT x is read with MAIL (defer_mail): it gets the unrequested reply.
        assert c.cmd("RCPT TO:<x@example.test>") == (250, "250 2.0.0 unrequested")
        c.cmd("RCPT TO:<y@example.test>")  # out of step noticed here, or else:
        final = c.cmd("DATA")
        if final[0] == 354:  # the gateway's own; the backend's DATA comes after the message
            c.send(MSG + b".\r\n")
            final = c.reply()  # where RCPT y's 250 answers DATA: a wrong class
    assert final == (451, "451 4.4.0 Next hop returned an invalid reply, try again later")
    assert be.messages() == []
    gw.wait_log(  # logged as backend_error at RCPT, or with the transaction at DATA
        lambda e: (
            e.get("error")
            in ("backend sent a reply that nothing asked for", "backend answered data with 250")
        )
    )


def test_a_backend_session_with_unread_replies_is_not_pooled(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """An extra reply after the end of DATA would have answered the next transaction's
    MAIL on the client's backend session; that session is closed instead of reused."""
    be = backend_factory("--lenient", "--extra-reply-after", ".")
    gw = gateway_factory(base_config(be.url, backend={"pool_size": 0}))
    with greeted(gw.port()) as c:
        for _ in range(3):
            c.cmd("MAIL FROM:<a@sender.test>")
            assert c.cmd("RCPT TO:<x@example.test>") == (250, "250 2.1.5 ok")
            assert c.cmd("DATA")[0] == 354
            c.send(MSG + b".\r\n")
            assert c.reply()[1].startswith("250 2.0.0 queued as L")
    assert len(be.messages()) == 3
    assert sum(cmd.startswith("EHLO") for cmd in be.commands()) == 3  # a session each


def test_a_backend_that_refuses_a_message_before_its_end_is_heard(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """It replies 552 after the first line and closes while the gateway is still
    sending: its refusal is the answer, not "connection lost" (451), which the client
    would retry for days with a message this backend will never take."""
    be = backend_factory("--lenient", "--refuse-early")
    gw = gateway_factory(base_config(be.url))
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8000  # 8 MB: more than
    with greeted(gw.port()) as c:  # the socket buffers take, so the write is cut short
        c.cmd("MAIL FROM:<a@sender.test>")
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(big + b".\r\n")
        assert c.reply() == (552, "552 5.3.4 message too big for this backend")
        assert c.cmd("NOOP")[0] == 250
    assert be.messages() == []


def test_backend_slow_beyond_timeout_gives_4xx(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    be = backend_factory("--data-delay", "5")
    cfg = base_config(be.url, backend={"url": be.url, "data_timeout": 1})
    gw = gateway_factory(cfg)
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=20) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        code, msg = s.data(MSG)
        assert (code, msg[:5]) == (451, b"4.4.2")


def test_failover_to_second_backend_and_one_backend_session_per_client_session(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    dead = f"smtp://127.0.0.1:{free_port()}"
    gw = gateway_factory(base_config([dead, backend.url], backend={"pool_size": 0}))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        for _ in range(3):
            s.mail("a@sender.test")
            s.rcpt("x@example.test")
            assert s.data(MSG)[0] == 250
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client2.test")
        s.mail("b@sender.test")
        s.rcpt("x@example.test")
        assert s.data(MSG)[0] == 250
    msgs = backend.messages()
    assert len(msgs) == 4
    # The first client session's three transactions used one backend session (its
    # XCLIENT once); the second client session had its own, never the first one's.
    assert len({m["session"] for m in msgs[:3]}) == 1
    assert msgs[3]["session"] != msgs[0]["session"]
    assert [m["xclient"]["HELO"] for m in msgs] == ["client.test"] * 3 + ["client2.test"]
    assert sum(1 for c in backend.commands() if c.startswith("CONNECT")) == 2
    assert sum(1 for c in backend.commands() if c.startswith("XCLIENT")) == 2
    # No RSET between completed transactions.
    assert not any(c.startswith("RSET") for c in backend.commands())


def test_xclient_passes_real_client(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("helo.client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(MSG)[0] == 250
    [m] = backend.messages()
    assert m["xclient"]["ADDR"] == "127.0.0.1"
    assert m["xclient"]["HELO"] == "helo.client.test"
    assert m["xclient"]["PROTO"] == "ESMTP"


def test_xforward_when_no_xclient(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    be = backend_factory("--xforward")
    gw = gateway_factory(base_config(be.url))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.helo("plain.client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(MSG)[0] == 250
    [m] = be.messages()
    assert m["xclient"] == {}
    assert m["xforward"]["HELO"] == "plain.client.test"
    assert m["xforward"]["PROTO"] == "SMTP"


def test_rset_aborts_backend_transaction(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.rset()[0] == 250
        s.mail("b@sender.test")
        s.rcpt("y@example.test")
        assert s.data(MSG)[0] == 250
    [m] = backend.messages()
    assert m["mail_from"] == "b@sender.test" and m["rcpt_tos"] == ["y@example.test"]
    assert "RSET" in "\n".join(backend.commands())


@pytest.mark.parametrize("mode", ["opportunistic", "required"])
def test_tls_to_backend(
    mode: str,
    tmp_path,
    backend_factory: Callable[..., Backend],
    gateway_factory: Callable[..., Gateway],
) -> None:
    from tests.support.certs import make_cert

    cert, key = make_cert(tmp_path / "be", "127.0.0.1")
    be = backend_factory("--tls-cert", str(cert), "--tls-key", str(key))
    bcfg = {"url": be.url, "tls": mode, "ca_file": str(cert), "server_name": "127.0.0.1"}
    gw = gateway_factory(base_config(be.url, backend=bcfg))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(MSG)[0] == 250
    [m] = be.messages()
    assert m["tls"] is True


def test_required_backend_tls_with_wrong_ca_never_delivers_plain(
    tmp_path, backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    from tests.support.certs import make_cert

    cert, key = make_cert(tmp_path / "be", "127.0.0.1")
    other, _ = make_cert(tmp_path / "other", "other.test")
    be = backend_factory("--tls-cert", str(cert), "--tls-key", str(key))
    bcfg = {"url": be.url, "tls": "required", "ca_file": str(other)}
    gw = gateway_factory(base_config(be.url, backend=bcfg))
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        assert s.mail("a@sender.test")[0] == 250  # MAIL waits for the first RCPT
        code, msg = s.rcpt("x@example.test")
        assert code == 451 and msg.startswith(b"4.4.1"), (code, msg)
    assert be.messages() == []


def test_lmtp_backend_per_recipient_replies(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    be = backend_factory(
        "--lmtp", "--lmtp-fail", "full@example.test", "--lmtp-refuse", "over@example.test"
    )
    gw = gateway_factory(base_config(f"lmtp://127.0.0.1:{be.port}"))
    with RawClient(gw.port()) as c:
        c.reply()
        c.cmd("EHLO client.test")

        def transaction(*rcpts: str) -> tuple[int, str]:
            c.cmd("MAIL FROM:<a@sender.test>")
            for rcpt in rcpts:
                assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(MSG + b".\r\n")
            return c.reply()

        code, text = transaction("x@example.test", "y@example.test")
        assert code == 250 and "backend delivered" in text
        # One recipient fails for now at DATA, one succeeds: SMTP can carry one answer
        # only, so the client gets a 4xx and retries; duplicates are possible, loss is not.
        code, text = transaction("x@example.test", "full@example.test")
        assert code == 451 and text.startswith("451 4.3.0")
        # A temporary failure beside a permanent one: still a retry.
        code, text = transaction("full@example.test", "over@example.test")
        assert code == 451 and text.startswith("451 4.3.0")
        # Delivered to some, refused for good to the others: a retry would deliver to
        # the same recipients again at every attempt, so a 5xx that names the refused.
        code, text = transaction("x@example.test", "over@example.test", "y@example.test")
        assert code == 554
        assert text.split("\n") == [
            "554-5.3.0 Delivered to 2 of 3 recipients; the next hop refused:",
            "554 5.3.0 <over@example.test> 552 5.2.2 <over@example.test> backend mailbox"
            " over quota",
        ]
    assert [m["rcpt_tos"] for m in be.messages()] == [
        ["x@example.test", "y@example.test"],
        ["x@example.test", "y@example.test"],
    ]
    assert any(c.startswith("EHLO") for c in be.commands())  # LHLO, logged as EHLO
    ev = gw.wait_log(lambda e: e.get("event") == "transaction" and str(e.get("backend", ""))
                     .startswith("554"))  # fmt: skip
    assert ev["outcome"] == "rejected"
    # The backend's verdict, not a client error: it does not count toward max_errors.
    assert gw.metric('smtp_gateway_transactions_total{outcome="rejected",reason="backend"}') == 1
    assert gw.metric("smtp_gateway_command_errors_total{") == 0


def test_data_timeout_gives_421(backend: Backend, gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory(base_config(backend.url, limits={"data_timeout": 0.5}))
    with greeted(gw.port()) as c:
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<x@example.test>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: never finished\r\n")
        code, text = c.reply()
        assert code == 421 and "4.4.2" in text
        assert c.closed()
    assert backend.messages() == []


def test_dot_lines_are_transparent_end_to_end(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url))
    content = b"Subject: dots\r\n\r\n.\r\n..two\r\n.three\r\nlast\r\n"
    with smtplib.SMTP("127.0.0.1", gw.port()) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("x@example.test")
        assert s.data(content)[0] == 250  # smtplib dot-stuffs on the wire
    [m] = backend.messages()
    assert m["data"].endswith(content)


def test_a_backend_refusing_xclient_defers_that_client_only(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """A refused XCLIENT is about what this client brought: its transaction gets a
    4xx and the backend session is discarded. It never goes on without the client's
    identity (the backend would judge the gateway instead, usually in its
    mynetworks), never turns XCLIENT off for the clients after it, and never counts
    toward the circuit breaker, however many clients it happens to."""
    be = backend_factory("--xclient", "--refuse-xclient")
    gw = gateway_factory(base_config(be.url))
    for _ in range(6):  # more than the breaker's 5 failures
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.ehlo("client.test")
            assert s.mail("a@sender.test")[0] == 250  # deferred: MAIL goes out with RCPT
            code, text = s.rcpt("x@example.test")
            assert (code, text[:5]) == (451, b"4.7.0"), text
    assert be.messages() == []
    assert not any(c.startswith(("MAIL", "RCPT")) for c in be.commands())
    # Asked for every client: a refusal is never remembered for the target.
    assert sum(1 for c in be.commands() if c.startswith("XCLIENT-REFUSED")) == 6
    assert gw.metric("smtp_gateway_backend_circuit_open") == 0
    gw.wait_log(lambda e: "refused a client's details" in e.get("msg", ""))


def test_xclient_and_xforward_values_stay_within_postfixs_limits(
    backend_factory: Callable[..., Backend], gateway_factory: Callable[..., Gateway]
) -> None:
    """The test backend refuses, as Postfix does, a value over 255 octets as sent. A
    HELO of 100 "=" is 300 octets as xtext, 200 "é" 1,200: both go as [UNAVAILABLE],
    and after XCLIENT the gateway greets with the client's own name when it can go
    on a command line, else with its address literal: never with the gateway's."""
    be = backend_factory("--xclient")
    fwd = backend_factory("--xforward")
    gws = [gateway_factory(base_config(b.url)) for b in (be, fwd)]
    for gw in gws:
        for helo in ("helo.client.test", "=" * 100, "é" * 200):
            with RawClient(gw.port()) as c:
                assert c.reply()[0] == 220
                assert c.cmd(f"EHLO {helo}".encode())[0] == 250
                replies = _txn(c, "MAIL FROM:<a@sender.test>", ["RCPT TO:<x@example.test>"], MSG)
                assert replies[-1][0] == 250, replies
    ms = be.messages()
    assert [m["xclient"]["HELO"] for m in ms] == [
        "helo.client.test",
        "[UNAVAILABLE]",
        "[UNAVAILABLE]",
    ]
    assert [m["helo"] for m in ms] == ["helo.client.test", "=" * 100, "[127.0.0.1]"]
    assert [m["xforward"]["HELO"] for m in fwd.messages()] == [
        "helo.client.test",
        "[UNAVAILABLE]",
        "[UNAVAILABLE]",
    ]
    assert not any("TOO-LONG" in c for b in (be, fwd) for c in b.commands())
