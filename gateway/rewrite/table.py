"""Rewrite tables: the rule forms an administrator writes, and their lookup order.

A key is one of
  user@example.org     the exact address
  user                 a local part, in any domain
  @example.org         every address in a domain
  /regex/              a Python regular expression on the whole address,
                       case-insensitive; `$1`, `${name}` in the value are its groups
and a value is a full address, `@domain` (keep the local part), or a local part
alone (keep the domain); virtual aliases may list several, comma-separated.

Lookup order, first hit wins: exact address, exact address without its
sub-address tag, local part (with, then without tag), @domain, then the
regular expressions in the order written. Domains compare case-insensitively;
local parts too, as every mail system's lookup tables do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.address import Address, AddressError, parse_path, quote_local

_GROUP = re.compile(r"\$(\d+|\{\w+\})")


class RuleError(ValueError):
    """A rule that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Subaddress:
    delimiter: str = "+"
    mode: Literal["keep", "strip"] = "keep"

    def split(self, local: str) -> tuple[str, str]:
        """`user+tag` -> ("user", "+tag"); no delimiter -> (local, "")."""
        if not self.delimiter:
            return local, ""
        i = local.find(self.delimiter)
        if i <= 0:
            return local, ""
        return local[:i], local[i:]


def make_address(local: str, domain: str) -> Address:
    """A rewrite result, validated as an RFC 5321 mailbox: no result of a rule can be
    something the backend would read differently (or a CR/LF in a header)."""
    try:
        return parse_path(f"<{quote_local(local)}@{domain}>")
    except AddressError as e:
        raise RuleError(f"result {local}@{domain} is not a valid address: {e}") from None


def _template(value: str) -> str:
    """`$1`/`${name}` (the Postfix spelling) into Python's `\\g<1>`."""
    escaped = value.replace("\\", "\\\\")
    return _GROUP.sub(lambda m: "\\g<" + m.group(1).strip("{}") + ">", escaped)


class Table:
    """One stage's rules. `lookup` returns the values of the first matching rule."""

    def __init__(self, rules: list[tuple[str, list[str]]], subaddress: Subaddress) -> None:
        self.sub = subaddress
        self.exact: dict[str, list[str]] = {}
        self.local: dict[str, list[str]] = {}
        self.domain: dict[str, list[str]] = {}
        self.regex: list[tuple[re.Pattern[str], list[str]]] = []
        for key, values in rules:
            if not values or any(not v.strip() for v in values):
                raise RuleError(f"{key!r}: empty value")
            for v in values:
                if any(c in v for c in "\r\n\0"):
                    raise RuleError(f"{key!r}: control character in value")
            if key.startswith("/") and key.endswith("/") and len(key) > 2:
                try:
                    pattern = re.compile(key[1:-1], re.IGNORECASE)
                except re.error as e:
                    raise RuleError(f"{key!r}: bad regular expression: {e}") from None
                self.regex.append((pattern, [_template(v) for v in values]))
            elif key.startswith("@"):
                self.domain[key[1:].lower()] = values
            elif "@" in key:
                local, _, dom = key.rpartition("@")
                self.exact[f"{local.lower()}@{dom.lower()}"] = values
            else:
                self.local[key.lower()] = values

    def __bool__(self) -> bool:
        return bool(self.exact or self.local or self.domain or self.regex)

    def lookup(self, addr: Address) -> list[Address] | None:
        """The rewritten address(es), or None when no rule matches."""
        if addr.is_null or addr.literal:
            return None
        local_l = addr.local.lower()
        base, tag = self.sub.split(addr.local)
        base_l = base.lower()
        hit: list[str] | None = None
        stripped = False
        if self.exact:
            hit = self.exact.get(f"{local_l}@{addr.domain}")
            if hit is None and tag:
                hit, stripped = self.exact.get(f"{base_l}@{addr.domain}"), True
        if hit is None and self.local:
            hit, stripped = self.local.get(local_l), False
            if hit is None and tag:
                hit, stripped = self.local.get(base_l), True
        if hit is None and self.domain:
            hit, stripped = self.domain.get(addr.domain), False
        if hit is not None:
            return [self._result(v, addr, base, tag, stripped) for v in hit]
        if self.regex:
            text = f"{addr.local}@{addr.domain}"
            for pattern, values in self.regex:
                m = pattern.fullmatch(text)
                if m is not None:
                    return [self._result(m.expand(v), addr, base, tag, False) for v in values]
        return None

    def _result(self, value: str, addr: Address, base: str, tag: str, stripped: bool) -> Address:
        keep_tag = self.sub.mode == "keep"
        if value.startswith("@"):
            # Keep the local part; "strip" drops its tag.
            local = addr.local if keep_tag else base
            return make_address(local, value[1:].lower())
        if "@" in value:
            local, _, dom = value.rpartition("@")
        else:
            local, dom = value, addr.domain
        if stripped and keep_tag and tag:
            local += tag  # user+tag matched `user`: the result keeps +tag
        return make_address(local, dom.lower())


def read_table_file(path: Path) -> list[tuple[str, list[str]]]:
    """One mapping per line: `KEY VALUE[, VALUE...]`; `#` comments, blank lines ignored.
    Errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RuleError(f"{path}: cannot read: {e.strerror}") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise RuleError(f"{path}:{n}: expected 'KEY VALUE', got {line!r}")
        values = [v.strip() for v in parts[1].split(",") if v.strip()]
        out.append((parts[0], values))
    return out
