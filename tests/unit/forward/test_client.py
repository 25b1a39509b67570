"""Our backend client against a minimal real socket server that records the packets."""

from __future__ import annotations

import asyncio

from gateway.forward.client import BackendBadReply, SmtpClient


async def _server(chunks: list[bytes], pipelining: bool, done: asyncio.Event) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 fake ESMTP\r\n")
        buf = b""
        mail_ok = False
        while True:
            data = await r.read(4096)
            if not data:
                break
            chunks.append(data)
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                verb = line[:4].upper()
                if verb == b"MAIL" and b"refused" in line:
                    w.write(b"550 5.7.1 sender refused\r\n")
                    mail_ok = False
                elif verb == b"RCPT" and not mail_ok:
                    w.write(b"503 5.5.1 need MAIL\r\n")
                elif verb == b"EHLO":
                    caps = b"250-PIPELINING\r\n" if pipelining else b""
                    w.write(b"250-fake\r\n" + caps + b"250 XFORWARD ADDR HELO\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                else:
                    mail_ok = mail_ok or verb == b"MAIL"
                    w.write(b"250 2.0.0 ok " + verb + b"\r\n")
        w.close()
        await w.wait_closed()
        done.set()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _client(server: asyncio.Server) -> SmtpClient:
    port = server.sockets[0].getsockname()[1]
    return await SmtpClient.connect(
        "127.0.0.1", port, helo="gw.test", connect_timeout=2, command_timeout=2, data_timeout=2
    )


async def _ended(c: SmtpClient, done: asyncio.Event, server: asyncio.Server) -> None:
    """Both ends closed and the server gone (no transport left for a ResourceWarning)."""
    await c.stream.wait_closed()
    await done.wait()
    server.close()
    await server.wait_closed()


async def _mail_with_xforward(pipelining: bool, sender: str = "a@b.test") -> list[bytes]:
    """MAIL with XFORWARD and the first RCPT; the packets the server received."""
    chunks: list[bytes] = []
    done = asyncio.Event()
    server = await _server(chunks, pipelining, done)
    c = await _client(server)
    attrs = {"ADDR": "192.0.2.1", "HELO": "h.test", "PORT": "1"}
    reply, rcpt = await c.mail(sender, [], attrs, ("r@c.test", []))
    if sender.startswith("refused"):
        # MAIL's refusal is the answer; the RCPT's 503 (if it was sent) is not.
        assert reply.code == 550 and rcpt is None
    else:
        assert reply.code == 250 and reply.lines == ["2.0.0 ok MAIL"]
        assert rcpt is not None and rcpt.lines == ["2.0.0 ok RCPT"]
    # The session is in step: the next command gets its own reply.
    assert (await c.command("noop", "NOOP")).lines == ["2.0.0 ok NOOP"]
    await c.quit()
    await _ended(c, done, server)
    return chunks


def test_xforward_mail_and_rcpt_pipelined_when_offered() -> None:
    chunks = asyncio.run(_mail_with_xforward(pipelining=True))
    both = [c for c in chunks if b"XFORWARD" in c]
    assert both and b"MAIL FROM:<a@b.test>\r\nRCPT TO:<r@c.test>\r\n" in both[0]
    # Only offered attributes are sent.
    assert b"XFORWARD ADDR=192.0.2.1 HELO=h.test\r\n" in both[0]


def test_one_by_one_without_pipelining() -> None:
    chunks = asyncio.run(_mail_with_xforward(pipelining=False))
    xf = [c for c in chunks if b"XFORWARD" in c]
    assert xf and b"MAIL" not in xf[0]
    mail = [c for c in chunks if b"MAIL" in c]
    assert mail and b"RCPT" not in mail[0]


def test_refused_mail_answers_for_the_pipelined_rcpt() -> None:
    chunks = asyncio.run(_mail_with_xforward(pipelining=True, sender="refused@b.test"))
    assert any(b"RCPT TO:<r@c.test>" in c for c in chunks)  # sent along, its 503 dropped


def test_refused_mail_sends_no_rcpt_one_by_one() -> None:
    chunks = asyncio.run(_mail_with_xforward(pipelining=False, sender="refused@b.test"))
    assert not any(b"RCPT" in c for c in chunks)


async def _answers(replies: dict[bytes, bytes], steps: list[str]) -> list[str]:
    """Each step against a server that answers each verb with `replies[verb]` (else
    250); what each step got: the reply, or the error and whether the session closed."""

    done = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 fake ESMTP\r\n")
        while line := await r.readline():
            w.write(replies.get(line[:4].upper(), b"250 2.0.0 ok\r\n"))
        w.close()
        await w.wait_closed()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    c = await _client(server)
    got = []
    for step in steps:
        try:
            if step == "DATA":
                got.append(str((await c.data(b"Subject: x\r\n\r\nx\r\n"))[0]))
            else:
                got.append(str(await c.command(step.lower(), step)))
        except BackendBadReply as e:
            got.append(f"{e} (closed: {c.closed})")
    c.close()
    await _ended(c, done, server)
    return got


def test_a_reply_of_the_wrong_class_is_a_bad_reply_and_ends_the_session() -> None:
    """RFC 5321 4.3.2: DATA gets 354, 4xx or 5xx; the others 2xx, 4xx or 5xx. A 250
    to DATA (a reply one behind) must never count as the message's acceptance."""
    assert asyncio.run(_answers({b"DATA": b"250 2.0.0 ok\r\n"}, ["DATA"])) == [
        "backend answered data with 250 (closed: True)"
    ]
    assert asyncio.run(_answers({b"RCPT": b"354 go ahead\r\n"}, ["RCPT"])) == [
        "backend answered rcpt with 354 (closed: True)"
    ]
    assert asyncio.run(_answers({b"MAIL": b"150 what\r\n"}, ["MAIL"])) == [
        "backend answered mail with 150 (closed: True)"
    ]
    # The expected classes pass: a refused DATA is an answer, not an error.
    assert asyncio.run(_answers({b"DATA": b"554 5.7.1 no\r\n"}, ["RCPT", "DATA"])) == [
        "250 2.0.0 ok",
        "554 5.7.1 no",
    ]
    assert asyncio.run(_answers({b"DATA": b"354 go\r\n"}, ["DATA"])) == ["250 2.0.0 ok"]
