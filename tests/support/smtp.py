"""A raw-socket SMTP client for tests that must control every byte."""

from __future__ import annotations

import socket


class RawClient:
    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        timeout: float = 10,
        source: str | None = None,
        connect: bool = True,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.buf = b""
        if connect:
            try:
                self.sock.connect((host, port))
            except OSError:
                self.sock.close()
                raise

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply; (0, '') on EOF."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return (0, "\n".join(lines))
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the server closed the connection (EOF or reset)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deliver(
    port: int,
    msg: bytes,
    *,
    rcpts: tuple[str, ...] = ("x@example.test",),
    sender: str = "a@sender.test",
    helo: str = "client.test",
) -> tuple[int, bytes]:
    """One whole transaction with smtplib; returns the reply to DATA."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo(helo)
        s.mail(sender)
        for r in rcpts:
            s.rcpt(r)
        return s.data(msg)
