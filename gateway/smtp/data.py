"""Reading DATA in bulk and enforcing what may reach the backend.

The whole buffer is searched for CRLF.CRLF (never line by line), which is the
only end of data we honour: `\\n.\\n`, `\\r.\\r` and friends stay inside the
content, where the bare CR/LF rule then rejects or normalises them, so a
lenient backend can never see a second message (SMTP smuggling).
"""

from __future__ import annotations

import re

from gateway.config import BareLinefeed
from gateway.smtp import replies
from gateway.smtp.replies import Reply
from gateway.stream import Stream

EOD = b"\r\n.\r\n"
_LONG_LINE = re.compile(rb"[^\r\n]{999}")
_ANY_EOL = re.compile(rb"\r\n|\r|\n")


class DataRefused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


async def read_message(stream: Stream, max_size: int, bare: BareLinefeed) -> bytes:
    """The unstuffed message, CRLF-terminated; raises DataRefused after draining it."""
    if await stream.peek(3) == b".\r\n":
        await stream.read_exactly(3)
        return b""
    # One CRLF of slack: the marker's leading CRLF ends the last line.
    raw, _total = await stream.read_until(EOD, max_size)
    if raw is None:
        raise DataRefused(replies.SIZE_EXCEEDED)
    return check_content(raw, bare)


def check_content(raw: bytes, bare: BareLinefeed) -> bytes:
    """Unstuff, and apply the bare CR/LF, NUL and line-length rules."""
    content = raw.replace(b"\r\n.", b"\r\n")
    if content.startswith(b"."):
        content = content[1:]
    content += b"\r\n"
    crlf = content.count(b"\r\n")
    if content.count(b"\n") != crlf or content.count(b"\r") != crlf:
        if bare is BareLinefeed.REJECT:
            raise DataRefused(replies.BARE_LF)
        content = _ANY_EOL.sub(b"\r\n", content)
    if b"\x00" in content:
        raise DataRefused(replies.NUL_IN_DATA)
    if _LONG_LINE.search(content):
        raise DataRefused(replies.DATA_LINE_TOO_LONG)
    return content
