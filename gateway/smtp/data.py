"""Reading DATA in bulk and enforcing what may reach the backend.

The whole buffer is searched for CRLF.CRLF (never line by line), which is the
only end of data we honour: `\\n.\\n`, `\\r.\\r` and friends stay inside the
content, where the bare CR/LF rule then rejects or normalises them, so a
lenient backend can never see a second message (SMTP smuggling).

The client's bytes are already dot-stuffed. A clean message is therefore
relayed exactly as received: no unstuffing and re-stuffing on the hot path.
Checks that need the message text get it unstuffed, once, on demand.

Lines longer than 998 octets are accepted and relayed, as Postfix does
(RFC 5321 4.5.3.1 asks receivers to avoid limits where they can); the
command-line limit is enforced separately.
"""

from __future__ import annotations

from gateway.config import BareLinefeed
from gateway.headers import too_many_received
from gateway.smtp import replies
from gateway.smtp.memory import Reservation
from gateway.smtp.replies import Reply
from gateway.stream import Stream
from gateway.wire import has_bare_cr_lf, stuff, unstuff

EOD = b"\r\n.\r\n"


class DataRefused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


async def read_message(
    stream: Stream, max_size: int, bare: BareLinefeed, room: Reservation
) -> bytes:
    """The message in wire form: dot-stuffed, CRLF-terminated lines, without the final dot.

    `room` holds the message's share of the process's memory budget: grown while
    the message arrives, fitted to its size once read (the caller releases it
    when the transaction ends); a refused message holds none of it. Raises
    DataRefused after the whole DATA section was consumed, so the session stays in
    step with the client.
    """
    if await stream.peek(3) == b".\r\n":
        await stream.read_exactly(3)
        return b""
    # max_size counts the content without the final CRLF, as before `keep`.
    raw = await stream.read_until(EOD, max_size, keep=2, room=room.grow)
    if isinstance(raw, int):  # discarded: too big, or no room for it, or both
        room.release()
        # Too big is permanent and says what the sender must change; no room only
        # defers, and a retry of a message too big would only be refused again.
        raise DataRefused(replies.SIZE_EXCEEDED if raw > max_size else replies.NO_MEMORY)
    if not room.fit(len(raw)):
        raise DataRefused(replies.NO_MEMORY)
    return check_wire(raw, bare)


def check_header_section(wire: bytes, max_size: int, max_received: int) -> None:
    """The header section's two limits, the cheap one first.

    Its size (`max_size` bytes of header fields, the empty line after them not
    counted): every check that reads header fields (DKIM, ARC, DMARC, the header
    rewriter) parses them on the event loop, at about 20 ms a megabyte, so a
    message of header fields up to the message size limit would hold the loop for
    a second. Only the first max_size + 2 bytes are searched.

    Its hops (RFC 5321 6.3): a message that has passed through more than
    `max_received` hops is in a loop (between this gateway and its backend, say);
    relaying it again would only feed the loop.
    """
    if (
        len(wire) > max_size
        and not wire.startswith(b"\r\n")  # no header fields at all
        and wire.find(b"\r\n\r\n", 0, max_size + 2) < 0
    ):
        raise DataRefused(replies.HEADER_TOO_BIG)
    if too_many_received(wire, max_received):
        raise DataRefused(replies.MAIL_LOOP)
    # A first line that starts with white space continues nothing of the client's: put
    # after the fields we add, it would continue our Authentication-Results (or tag)
    # with whatever results the client wrote. (Stuffed: ". x" is " x".)
    if wire[:1] in (b" ", b"\t") or wire[:2] in (b". ", b".\t"):
        raise DataRefused(replies.HEADER_STARTS_FOLDED)


def check_wire(wire: bytes, bare: BareLinefeed) -> bytes:
    """Apply the NUL and bare CR/LF rules to stuffed bytes; return what may be relayed."""
    if b"\x00" in wire:
        raise DataRefused(replies.NUL_IN_DATA)
    if has_bare_cr_lf(wire):
        if bare is BareLinefeed.REJECT:
            raise DataRefused(replies.BARE_LF)
        # CRLF, CR and LF to CRLF, with three replaces at C speed: the regular
        # expression's substitution took 9 s on the event loop for 25 MB of bare LF.
        content = unstuff(wire).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return stuff(content.replace(b"\n", b"\r\n"))
    return wire
