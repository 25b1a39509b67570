"""Rewrite tables (gateway/rewrite/table.py): the rule forms, their lookup order,
subaddresses and the rules refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.rewrite.table import RuleError, Subaddress, Table, read_table_file
from tests.unit.rewrite.helpers import a


def table(rules: dict[str, str | list[str]], mode: str = "keep") -> Table:
    items = [(k, [v] if isinstance(v, str) else v) for k, v in rules.items()]
    return Table(items, Subaddress("+", mode))  # type: ignore[arg-type]


def look(t: Table, addr: str) -> list[str] | None:
    hit = t.lookup(a(addr))
    return None if hit is None else [str(x) for x in hit]


def test_each_rule_form() -> None:
    t = table(
        {
            "ceo@example.org": "jane.doe@example.org",
            "postmaster": "hostmaster",
            "@old.example": "@example.org",
            "@legacy.example": "catchall@example.org",
            r"/^(\w+)\.(\w+)@corp\.example$/": "$2.$1@example.org",
            r"/^(?P<user>[^@]+)@(?P<dept>\w+)\.branch\.example$/": "${dept}-${user}@example.org",
        }
    )
    assert look(t, "ceo@example.org") == ["jane.doe@example.org"]
    assert look(t, "postmaster@anything.test") == ["hostmaster@anything.test"]  # keeps domain
    assert look(t, "bob@old.example") == ["bob@example.org"]  # keeps local part
    assert look(t, "bob@legacy.example") == ["catchall@example.org"]
    assert look(t, "john.smith@corp.example") == ["smith.john@example.org"]
    assert look(t, "kim@sales.branch.example") == ["sales-kim@example.org"]
    assert look(t, "nobody@elsewhere.test") is None


def test_case_insensitive_domains_and_lookups() -> None:
    t = table({"CEO@Example.ORG": "boss@example.org", "@OLD.example": "@example.org"})
    assert look(t, "ceo@EXAMPLE.org") == ["boss@example.org"]
    assert look(t, "Bob@Old.Example") == ["Bob@example.org"]  # local case is kept
    assert look(table({"/^x@Y\\.test$/": "z@example.org"}), "X@y.TEST") == ["z@example.org"]


def test_lookup_order_exact_then_local_then_domain_then_regex() -> None:
    t = table(
        {
            "/.*/": "regex@r.test",
            "@d.test": "domain@r.test",
            "joe": "local@r.test",
            "joe@d.test": "exact@r.test",
        }
    )
    assert look(t, "joe@d.test") == ["exact@r.test"]
    assert look(t, "joe@other.test") == ["local@r.test"]
    assert look(t, "ann@d.test") == ["domain@r.test"]
    assert look(t, "ann@other.test") == ["regex@r.test"]


def test_subaddress_kept_or_stripped() -> None:
    keep = table({"joe@d.test": "joseph@example.org", "@old.test": "@example.org"})
    assert look(keep, "joe+news@d.test") == ["joseph+news@example.org"]
    assert look(keep, "ann+x@old.test") == ["ann+x@example.org"]
    strip = table({"joe@d.test": "joseph@example.org", "@old.test": "@example.org"}, "strip")
    assert look(strip, "joe+news@d.test") == ["joseph@example.org"]
    assert look(strip, "ann+x@old.test") == ["ann@example.org"]
    # An exact rule for the tagged address wins over the untagged one.
    t = table({"joe+vip@d.test": "vip@example.org", "joe@d.test": "joseph@example.org"})
    assert look(t, "joe+vip@d.test") == ["vip@example.org"]


def test_bad_rules_are_refused_with_their_key(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="bad regular expression"):
        table({"/(unclosed/": "x@y.test"})
    with pytest.raises(RuleError, match="control character"):
        table({"a@b.test": "x@y.test\r\nBcc: evil@z.test"})
    # A capture that cannot make a valid address is an error, never a strange address.
    t = table({"/^(.*)@in\\.test$/": "x@$1.example"})
    with pytest.raises(RuleError, match="not a valid address"):
        t.lookup(a('"a b"@in.test'))
    f = tmp_path / "map"
    f.write_text("# comment\n\nsales@example.org alice@example.org, bob@example.org\nbroken\n")
    with pytest.raises(RuleError, match=r"map:4: expected 'KEY VALUE'"):
        read_table_file(f)
