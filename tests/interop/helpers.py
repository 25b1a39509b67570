"""What the interop tests share: a client from a chosen loopback address, one
transaction, and finding a delivered message by its subject."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol

from tests.support.procs import Gateway, base_config
from tests.support.smtp import RawClient


class Mta(Protocol):
    def messages(self, user: str) -> list[bytes]: ...


@contextmanager
def client(port: int, source: str, helo: str) -> Iterator[RawClient]:
    """An SMTP session to the gateway from `source` (any 127.0.0.0/8 address is this
    machine's), greeted with `helo`."""
    with RawClient(port, source=source) as c:
        assert c.reply()[0] == 220
        code, text = c.cmd(f"EHLO {helo}".encode())
        assert code == 250, text
        yield c


UTF8_BODY = "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"


def message(subject: str, body: str = "hello\r\n", extra: str = "") -> bytes:
    return (
        f"From: <a@sender.test>\r\nTo: <alice@example.test>\r\nSubject: {subject}\r\n"
        f"{extra}\r\n{body}"
    ).encode()


def transaction(
    c: RawClient, sender: str, rcpts: list[str], data: bytes | None, mail_params: str = ""
) -> list[tuple[int, str]]:
    """MAIL, each RCPT, DATA and the message, one command at a time: every reply."""
    out = [c.cmd(f"MAIL FROM:<{sender}>{mail_params}".encode())]
    out += [c.cmd(f"RCPT TO:<{r}>".encode()) for r in rcpts]
    if data is None:
        return out
    out.append(c.cmd("DATA"))
    if out[-1][0] == 354:
        c.send(data + b".\r\n")
        out.append(c.reply())
    return out


def send_one(port: int, source: str, helo: str, rcpt: str, subject: str) -> list[tuple[int, str]]:
    """One client session with one message: every reply of its transaction."""
    with client(port, source, helo) as c:
        return transaction(c, "a@sender.test", [rcpt], message(subject))


def wait_subject(mta: Mta, user: str, subject: str, timeout: float = 15.0) -> EmailMessage:
    """The message delivered to `user` with this subject (delivery is asynchronous in
    a real MTA: poll its mailbox until it is there)."""
    deadline = time.monotonic() + timeout
    while True:
        for raw in mta.messages(user):
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            if msg["Subject"] == subject:
                assert isinstance(msg, EmailMessage)
                return msg
        assert time.monotonic() < deadline, f"no message {subject!r} for {user}"
        time.sleep(0.05)


def subjects(mta: Mta, user: str) -> list[str]:
    return [
        str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"])
        for raw in mta.messages(user)
    ]


def received(msg: EmailMessage) -> list[str]:
    """Received fields, newest first, unfolded."""
    return [" ".join(str(v).split()) for v in msg.get_all("Received", [])]


def transactions(events: list[dict[str, Any]], client_ip: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "transaction" and e.get("client") == client_ip]


class Restartable(Mta, Protocol):
    def stop(self) -> None: ...

    def start(self) -> None: ...


def pipelined_then_another(mta: Mta, port: int, source: str) -> None:
    """MAIL, three RCPTs (one unknown) and DATA in one write, the message, then a
    second transaction on the same session (after the backend's refusal): the
    refused recipient gets the backend's 550, the others the message."""
    with client(port, source, "pipelining.example") as c:
        c.send(
            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        )
        assert [c.reply()[0] for _ in range(5)] == [250, 250, 550, 250, 354]
        c.send(message(f"pipelined {source}") + b".\r\n")
        assert c.reply()[0] == 250
        replies = transaction(c, "a@sender.test", ["bob@example.test"], message(f"next {source}"))
        assert replies[-1][0] == 250, replies
    wait_subject(mta, "alice", f"pipelined {source}")
    wait_subject(mta, "bob", f"pipelined {source}")
    wait_subject(mta, "bob", f"next {source}")


def down_then_up(mta: Restartable, port: int, source: str) -> None:
    """The backend stopped: 4xx (the client keeps its message); started again: the
    next transaction is delivered, and nothing of the refused one ever is."""
    mta.stop()
    try:
        with client(port, source, "outage.example") as c:
            replies = transaction(c, "a@sender.test", ["alice@example.test"], message("down"))
            assert replies[1][1].startswith("451 4.4."), replies
    finally:
        mta.start()
    with client(port, source, "outage.example") as c:
        replies = transaction(c, "a@sender.test", ["alice@example.test"], message("up again"))
        assert replies[-1][0] == 250, replies
    wait_subject(mta, "alice", "up again")
    assert "down" not in subjects(mta, "alice")


@contextmanager
def gateway(url: str, workdir: Path, **over: Any) -> Iterator[Gateway]:
    """One gateway worker in front of `url`, for our test domain; stopped at the end."""
    g = Gateway(workdir, base_config(url, local_domains=["example.test"], **over))
    try:
        yield g
    finally:
        g.stop()
