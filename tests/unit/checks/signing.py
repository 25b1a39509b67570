"""A message signed with dkimpy, for the tests of both verifiers (the check in
gateway/checks/dkim.py and the RSA verifier in gateway/checks/dkimrsa.py)."""

from __future__ import annotations

from typing import Any

import dkim

from tests.support.dkimkeys import Key

MSG = (
    b"From: Alice <alice@example.test>\r\nTo: bob@example.net\r\nSubject: hello  there\r\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
    b"Hello Bob,\r\n  spaced   line \r\n\r\n\r\n"
)


def _sign(key: Key, msg: bytes = MSG, **kw: Any) -> bytes:
    sig = dkim.sign(
        msg,
        b"s1",
        b"example.test",
        key.private,
        include_headers=kw.pop("include", [b"from", b"to", b"subject", b"date"]),
        **kw,
    )
    return bytes(sig) + msg
