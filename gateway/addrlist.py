"""Address-list header values (From, Reply-To, To, Cc): what the email package's
parsers may be given.

Both of its parsers are slow on what a client can write into one field value:
`_header_value_parser.get_address_list` costs about 6 µs a character and is
quadratic in comments (48 KB of "(c)" took 5.5 s), `utils.getaddresses` costs up
to 3 µs a character and recurses once per nested comment (RecursionError past
about 1,000). So a value goes to them only when it is short and has few comments;
and the common plain value (addresses, or display names of plain words before
an address in angle brackets) needs no library at all: it can be read only one
way.
"""

from __future__ import annotations

import re

# Comments in a value a library parser reads (nesting is bounded by the count).
MAX_COMMENTS = 32

# RFC 5322 atext, as a character class (DMARC's From reader uses it too).
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ATEXT = ATEXT
_WS = r"[ \t\r\n]"
_ADDR = rf"{_ATEXT}++(?:\.{_ATEXT}++)*+@{_ATEXT}++(?:\.{_ATEXT}++)*+"
_PHRASE = rf"{_ATEXT}++(?:{_WS}++{_ATEXT}++)*+"
# Possessive throughout: each character is looked at a bounded number of times.
_ITEM = re.compile(rf"{_WS}*+(?:{_ADDR}|{_PHRASE}{_WS}*+<{_ADDR}>){_WS}*+")
_SPECIAL = re.compile(r"[\"(\\:;\[\]]")


def plain(value: str) -> bool:
    """A comma-separated list of `local@domain` or `Word Word <local@domain>`, ASCII,
    with nothing any parser reads differently (no quotes, comments, groups,
    escapes, domain literals, dots in a display name, empty members)."""
    if not value.isascii() or _SPECIAL.search(value):
        return False
    return all(_ITEM.fullmatch(item) for item in value.split(","))


def too_complex(value: str, max_chars: int) -> bool:
    """True when a library parser must not read this value: too long, or too many
    comments."""
    return len(value) > max_chars or value.count("(") > MAX_COMMENTS
