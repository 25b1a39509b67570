"""Our backend client against a minimal real socket server that records the packets."""

from __future__ import annotations

import asyncio

from gateway.forward.client import SmtpClient


async def _server(chunks: list[bytes], pipelining: bool, done: asyncio.Event) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 fake ESMTP\r\n")
        buf = b""
        while True:
            data = await r.read(4096)
            if not data:
                break
            chunks.append(data)
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    caps = b"250-PIPELINING\r\n" if pipelining else b""
                    w.write(b"250-fake\r\n" + caps + b"250 XFORWARD ADDR HELO\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                else:
                    w.write(b"250 2.0.0 ok " + verb + b"\r\n")
        w.close()
        await w.wait_closed()
        done.set()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _mail_with_xforward(pipelining: bool) -> list[bytes]:
    chunks: list[bytes] = []
    done = asyncio.Event()
    server = await _server(chunks, pipelining, done)
    port = server.sockets[0].getsockname()[1]
    c = await SmtpClient.connect(
        "127.0.0.1", port, helo="gw.test", connect_timeout=2, command_timeout=2, data_timeout=2
    )
    reply = await c.mail("a@b.test", [], {"ADDR": "192.0.2.1", "HELO": "h.test", "PORT": "1"})
    assert reply.code == 250 and reply.lines == ["2.0.0 ok MAIL"]
    await c.quit()
    await c.stream.wait_closed()
    await done.wait()
    server.close()
    await server.wait_closed()
    return chunks


def test_xforward_and_mail_pipelined_when_offered() -> None:
    chunks = asyncio.run(_mail_with_xforward(pipelining=True))
    both = [c for c in chunks if b"XFORWARD" in c]
    assert both and b"MAIL FROM:<a@b.test>" in both[0]
    # Only offered attributes are sent.
    assert b"XFORWARD ADDR=192.0.2.1 HELO=h.test\r\n" in both[0]


def test_one_by_one_without_pipelining() -> None:
    chunks = asyncio.run(_mail_with_xforward(pipelining=False))
    xf = [c for c in chunks if b"XFORWARD" in c]
    assert xf and b"MAIL" not in xf[0]
