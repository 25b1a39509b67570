"""Authentication results gathered during a transaction, for the A-R header."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One RFC 8601 resinfo: method=result (reason) ptype.property=value ..."""

    method: str
    result: str
    props: dict[str, str] = field(default_factory=dict)
    reason: str = ""
