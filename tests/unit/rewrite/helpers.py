"""What the rewrite tests share: an address from its text."""

from __future__ import annotations

from gateway.address import Address, parse_path


def a(text: str) -> Address:
    return parse_path(f"<{text}>")
