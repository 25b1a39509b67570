"""Shared bits of the security battery: process memory and a greeted raw session."""

from __future__ import annotations

from pathlib import Path

from tests.support.smtp import RawClient


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def send_message(c: RawClient, body: bytes = b"Subject: x\r\n\r\nx\r\n") -> int:
    """One whole transaction on an open session; the reply code to the end of DATA."""
    c.cmd("MAIL FROM:<a@sender.test>")
    c.cmd("RCPT TO:<x@example.test>")
    c.cmd("DATA")
    c.send(body + b".\r\n")
    return c.reply()[0]


def greeted(port: int, *, helo: bool = True, timeout: float = 10) -> RawClient:
    c = RawClient(port, timeout=timeout)
    assert c.reply()[0] == 220
    if helo:
        assert c.cmd("EHLO client.test")[0] == 250
    return c
