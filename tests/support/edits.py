"""Random byte edits for the differential tests against dkimpy.

Hypothesis draws where and what; `edit_byte` applies it so that every line end stays
CRLF, as the DATA reader guarantees to the verifiers (a bare CR or LF is refused
or normalised before any check sees the message)."""

from __future__ import annotations

from hypothesis import strategies as st

EDIT_BYTES = b" ;=:\tabcdefghiz=ABCDEF0123456789+/-.@"
EDIT_OPS = "rdi"  # replace, delete, insert


def edit_byte(m: bytearray, pos: int, op: str, byte: int) -> None:
    """Replace, delete or insert one byte at `pos`, unless that would break a CRLF."""
    if m[pos] in b"\r\n" or (pos and m[pos - 1] == 0x0D):
        return
    if op == "r":
        m[pos] = byte
    elif op == "d":
        del m[pos]
    else:
        m.insert(pos, byte)


# One to three edits: where (a fraction of the span it applies to), which, what byte.
EDITS = st.lists(
    st.tuples(
        st.floats(0, 1, exclude_max=True), st.sampled_from(EDIT_OPS), st.sampled_from(EDIT_BYTES)
    ),
    min_size=1,
    max_size=3,
)
