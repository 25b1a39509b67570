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

import asyncio

from gateway import replies
from gateway.config import BareLinefeed, Limits
from gateway.headers import too_many_received
from gateway.replies import Reply
from gateway.smtp.memory import Reservation
from gateway.smtp.protocol import Receiver
from gateway.stream import Stream
from gateway.wire import has_bare_cr_lf, normalise

# A message larger than this has its whole-message passes (NUL, bare CR/LF, the
# normalisation) done in a thread: each pass is one C call that holds the GIL for
# at most tens of milliseconds, and the loop runs between them, where on the loop
# the passes over 25 MB would run back to back for 50 to 250 ms.
THREAD_BYTES = 1024 * 1024


class DataRefused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


async def read_message(
    stream: Stream, rx: Receiver, max_size: int, bare: BareLinefeed, room: Reservation
) -> bytes:
    """The message in wire form: dot-stuffed, CRLF-terminated lines, without the final dot.

    `rx` frames it (smtp/protocol.py); this waits for the stream's bytes between.

    `room` holds the message's share of the process's memory budget: grown while
    the message arrives, fitted to its size once read (the caller releases it
    when the transaction ends); a refused message holds none of it. Raises
    DataRefused after the whole DATA section was consumed, so the session stays in
    step with the client.
    """
    # max_size counts the content without the CRLF that ends its last line.
    rx.start_message(max_size, room.grow)
    raw = rx.next_message()
    while raw is None:
        await stream.more()
        raw = rx.next_message()
    if isinstance(raw, int):  # discarded: too big, or no room for it, or both
        room.release()
        # Too big is permanent and says what the sender must change; no room only
        # defers, and a retry of a message too big would only be refused again.
        raise DataRefused(replies.SIZE_EXCEEDED if raw > max_size else replies.NO_MEMORY)
    if not room.fit(len(raw)):
        raise DataRefused(replies.NO_MEMORY)
    if len(raw) > THREAD_BYTES:
        return await asyncio.to_thread(check_wire, raw, bare)
    return check_wire(raw, bare)


def check_header_section(wire: bytes, limits: Limits) -> None:
    """The header section's limits, the cheap ones first.

    Its size (`max_header_size` bytes of header fields, the empty line after them
    not counted), its number of fields (`max_header_fields`) and of lines
    (`max_header_lines`, continuation lines included): every check that
    reads header fields (DKIM, ARC, DMARC, the forged-field filter, the header
    rewriter) parses each of them on the event loop, so their work is bounded by
    both. Only the first max_header_size + 2 bytes are searched, and the fields
    are counted at C speed (lines, less continuation lines).

    Its hops (RFC 5321 6.3): a message that has passed through more than
    `max_received_headers` hops is in a loop (between this gateway and its backend,
    say); relaying it again would only feed the loop.
    """
    max_size = limits.max_header_size
    if wire.startswith(b"\r\n"):
        end = 0  # no header fields at all
    else:
        end = wire.find(b"\r\n\r\n", 0, max_size + 2)
        if end < 0:
            if len(wire) > max_size:
                raise DataRefused(replies.HEADER_TOO_BIG)
            end = len(wire)
    if end:
        lines, fields = _lines_and_fields(wire, end + 2)
        if fields > limits.max_header_fields:
            raise DataRefused(replies.HEADER_TOO_MANY_FIELDS)
        if lines > limits.max_header_lines:
            raise DataRefused(replies.HEADER_TOO_MANY_LINES)
    if too_many_received(wire, limits.max_received_headers):
        raise DataRefused(replies.MAIL_LOOP)
    # A first line that starts with white space continues nothing of the client's: put
    # after the fields we add, it would continue our Authentication-Results (or tag)
    # with whatever results the client wrote. (Stuffed: ". x" is " x".)
    if wire[:1] in (b" ", b"\t") or wire[:2] in (b". ", b".\t"):
        raise DataRefused(replies.HEADER_STARTS_FOLDED)


def _lines_and_fields(wire: bytes, end: int) -> tuple[int, int]:
    """Lines and header fields in wire[:end] (stuffed, CRLF lines): fields are the
    lines that do not continue the one before (" x", and ". x" which unstuffs to it)."""
    folded = sum(wire.count(p, 0, end) for p in (b"\r\n ", b"\r\n\t", b"\r\n. ", b"\r\n.\t"))
    lines = wire.count(b"\r\n", 0, end)
    return lines, lines - folded


def check_wire(wire: bytes, bare: BareLinefeed) -> bytes:
    """Apply the NUL and bare CR/LF rules to stuffed bytes; return what may be relayed."""
    if b"\x00" in wire:
        raise DataRefused(replies.NUL_IN_DATA)
    if has_bare_cr_lf(wire):
        if bare is BareLinefeed.REJECT:
            raise DataRefused(replies.BARE_LF)
        # CRLF, CR and LF to CRLF, with replaces at C speed (the regular expression's
        # substitution took 9 s on the event loop for 25 MB of bare LF), a piece at a
        # time (a large message is normalised in a thread: see THREAD_BYTES).
        return normalise(wire)
    return wire
