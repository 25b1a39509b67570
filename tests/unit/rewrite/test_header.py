"""Rewrite tables, stages, SRS and header editing (pure logic; the SMTP path is in
tests/integration/test_rewrite.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.address import Address, parse_path
from gateway.addrlist import MAX_COMMENTS, plain
from gateway.rewrite.engine import AliasLoop, Rewriter
from gateway.rewrite.header import LIBRARY_BUDGET, MAX_ADDRESSES, rewrite_headers, rewrite_value
from gateway.rewrite.options import RewriteOptions
from gateway.rewrite.srs import Srs, SrsError
from gateway.rewrite.table import RuleError, Subaddress, Table, read_table_file


def a(text: str) -> Address:
    return parse_path(f"<{text}>")


def table(rules: dict[str, str | list[str]], mode: str = "keep") -> Table:
    items = [(k, [v] if isinstance(v, str) else v) for k, v in rules.items()]
    return Table(items, Subaddress("+", mode))  # type: ignore[arg-type]


def look(t: Table, addr: str) -> list[str] | None:
    hit = t.lookup(a(addr))
    return None if hit is None else [str(x) for x in hit]


def rewriter(tmp: Path | None = None, **opts: Any) -> Rewriter:
    return Rewriter(RewriteOptions.model_validate(opts), tmp or Path("."))


# -- rule forms -----------------------------------------------------------------------
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


# -- stages -------------------------------------------------------------------------
def test_alias_fan_out_recursion_and_self_reference() -> None:
    rw = rewriter(
        virtual_alias={
            "rules": {
                "team@example.org": ["sales@example.org", "ops@example.org", "cto@example.org"],
                "sales@example.org": "alice@example.org, bob@example.org",
                "ops@example.org": ["ops@example.org", "bob@example.org"],
            }
        }
    )
    out = [str(x) for x in rw.expand(a("team@example.org"))]
    # Depth first, in order, de-duplicated; ops maps to itself and stays.
    assert out == [
        "alice@example.org",
        "bob@example.org",
        "ops@example.org",
        "cto@example.org",
    ]
    assert [str(x) for x in rw.expand(a("other@example.org"))] == ["other@example.org"]


def test_alias_loops_depth_and_width_are_refused() -> None:
    loop = rewriter(virtual_alias={"rules": {"a@x.test": "b@x.test", "b@x.test": "a@x.test"}})
    with pytest.raises(AliasLoop, match=r"a@x\.test -> b@x\.test -> a@x\.test"):
        loop.expand(a("a@x.test"))
    chain = {f"n{i}@x.test": f"n{i + 1}@x.test" for i in range(20)}
    deep = rewriter(virtual_alias={"rules": chain, "max_depth": 5})
    with pytest.raises(AliasLoop, match="deeper than 5"):
        deep.expand(a("n0@x.test"))
    wide = rewriter(
        virtual_alias={
            "rules": {"all@x.test": [f"u{i}@x.test" for i in range(10)]},
            "max_expansion": 5,
        }
    )
    with pytest.raises(AliasLoop, match="more than 5"):
        wide.expand(a("all@x.test"))


def test_masquerade_with_exceptions() -> None:
    rw = rewriter(
        masquerade={
            "domains": ["example.org"],
            "exceptions": ["root"],
            "exclude_domains": ["keep.example.org"],
        }
    )
    assert str(rw.sender(a("joe@host.dept.example.org"))) == "joe@example.org"
    assert str(rw.sender(a("joe@example.org"))) == "joe@example.org"
    assert str(rw.sender(a("root@host.example.org"))) == "root@host.example.org"
    assert str(rw.sender(a("joe@mx.keep.example.org"))) == "joe@mx.keep.example.org"
    assert str(rw.sender(a("joe@notexample.org"))) == "joe@notexample.org"


def test_sender_stages_combine_in_order() -> None:
    rw = rewriter(
        canonical_sender={"rules": {"@old.example": "@mail.example.org"}},
        masquerade={"domains": ["example.org"]},
    )
    steps = rw.sender_steps(a("joe@old.example"))
    assert [(s.stage, str(s.result[0])) for s in steps] == [
        ("canonical_sender", "joe@mail.example.org"),
        ("masquerade", "joe@example.org"),
    ]


def test_recipient_stages_combine_in_order() -> None:
    rw = rewriter(
        canonical_recipient={"rules": {"@old.example": "@example.org"}},
        virtual_alias={"rules": {"sales@example.org": ["a@example.org", "b@example.org"]}},
    )
    canon = rw.canonical_recipient(a("sales@old.example"))
    assert str(canon) == "sales@example.org"
    assert [str(x) for x in rw.expand(canon)] == ["a@example.org", "b@example.org"]
    # The alias table sees only the canonical name: the old one is not in it.
    assert [str(x) for x in rw.expand(a("sales@old.example"))] == ["sales@old.example"]


def test_tables_from_a_file_reload_with_the_policy(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("sales@example.org alice@example.org, bob@example.org\n")
    opts = {"virtual_alias": {"file": "aliases", "rules": {"x@example.org": "y@example.org"}}}
    rw = rewriter(tmp_path, **opts)
    assert [str(x) for x in rw.expand(a("sales@example.org"))] == [
        "alice@example.org",
        "bob@example.org",
    ]
    (tmp_path / "aliases").write_text("sales@example.org carol@example.org\n")
    rw2 = rewriter(tmp_path, **opts)  # what a reload does
    assert [str(x) for x in rw2.expand(a("sales@example.org"))] == ["carol@example.org"]


# -- SRS ----------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1_795_000_000.0

    def __call__(self) -> float:
        return self.t


def test_srs_forward_reverse_round_trip_and_double_forward() -> None:
    clock = Clock()
    srs = Srs("srs.example.org", ["new", "old"], clock=clock)
    local = srs.forward("user", "orig.test")
    assert local.startswith("SRS0=") and local.endswith("=orig.test=user")
    assert srs.reverse(local) == ("user", "orig.test")
    assert srs.reverse(local.lower()) == ("user".lower(), "orig.test")  # case folded en route
    # A second forwarder (hop2) of our SRS0 address makes SRS1; its bounce comes to
    # hop2, which reverses to our SRS0; ours reverses to the original.
    hop2 = Srs("hop2.test", ["other"], clock=clock)
    srs1 = hop2.forward(local, "srs.example.org")
    assert srs1.startswith("SRS1=") and "=srs.example.org==" in srs1
    back_local, back_domain = hop2.reverse(srs1)
    assert back_domain == "srs.example.org"
    assert srs.reverse(back_local) == ("user", "orig.test")


def test_srs_hash_cannot_be_moved_across_the_domain_local_boundary() -> None:
    """Hashed run together, "bank.co" + "mceo" and "bank.com" + "ceo" were the same
    input: one address issued for mceo@bank.co reversed, re-split, to ceo@bank.com."""
    srs = Srs("srs.example.org", ["k"], clock=Clock())
    issued = srs.forward("mceo", "bank.co")
    _, h, tt, _, _ = issued.split("=")
    with pytest.raises(SrsError, match="hash"):
        srs.reverse(f"SRS0={h}={tt}=bank.com=ceo")
    assert srs.reverse(issued) == ("mceo", "bank.co")


def test_a_message_that_starts_with_an_empty_line_has_no_headers_to_rewrite() -> None:
    wire = b"\r\nFrom: a@old.example\r\nTo: b@old.example\r\n\r\nbody\r\n"
    assert rewrite_headers(wire, old_to_new, old_to_new) == (wire, 0)


def test_srs_tampered_expired_and_rotated() -> None:
    clock = Clock()
    old = Srs("srs.example.org", ["old"], clock=clock)
    made_with_old = old.forward("user", "orig.test")
    rotated = Srs("srs.example.org", ["new", "old"], clock=clock)
    assert rotated.reverse(made_with_old) == ("user", "orig.test")  # old secret verifies
    assert rotated.forward("user", "orig.test") != made_with_old  # new secret signs
    dropped = Srs("srs.example.org", ["new"], clock=clock)
    with pytest.raises(SrsError, match="hash"):
        dropped.reverse(made_with_old)
    parts = made_with_old.split("=")
    with pytest.raises(SrsError, match="hash"):
        rotated.reverse("=".join([*parts[:4], "attacker"]))  # a different user
    with pytest.raises(SrsError, match="hash"):
        rotated.reverse("=".join([parts[0], "AAAA", *parts[2:]]))
    clock.t += 22 * 86400
    with pytest.raises(SrsError, match="expired"):
        rotated.reverse(made_with_old)
    with pytest.raises(SrsError, match="malformed"):
        rotated.reverse("SRS0=onlytwo=parts")


def test_srs_hash_is_case_free_base32_of_the_configured_length() -> None:
    srs = Srs("srs.example.org", ["k"], clock=Clock())
    hash_ = srs.forward("user", "orig.test").split("=")[1]
    assert len(hash_) == 12 and set(hash_) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    short = Srs("srs.example.org", ["k"], clock=Clock(), hash_length=8)
    local = short.forward("user", "orig.test")
    assert len(local.split("=")[1]) == 8
    with pytest.raises(SrsError, match="hash"):  # a hash of the other length never verifies
        srs.reverse(local)


def test_failed_srs_reverses_are_limited_per_client_and_network() -> None:
    from gateway.smtp.guard import FailureLimit

    now = [1000.0]
    guard = FailureLimit(limit=5, window=3600, clock=lambda: now[0], max_clients=100)
    for _ in range(5):
        assert not guard.blocked("192.0.2.7")
        guard.failed("192.0.2.7")
    assert guard.blocked("192.0.2.7")
    assert not guard.blocked("192.0.2.8")  # the network has room for 20
    for n in range(15):
        guard.failed(f"192.0.2.{100 + n}")
    assert guard.blocked("192.0.2.8")  # 20 in the /24
    assert not guard.blocked("198.51.100.1")
    now[0] += 3600
    assert not guard.blocked("192.0.2.7") and not guard.blocked("192.0.2.8")
    for n in range(200):  # bounded memory: the oldest keys go
        guard.failed(f"203.0.113.{n % 250}")
    assert len(guard._seen) <= 100


def test_srs_stage_leaves_our_own_domain_alone() -> None:
    rw = rewriter(srs={"enabled": True, "domain": "srs.example.org", "secrets": ["k"]})
    fwd = rw.srs_forward(a("joe@orig.test"))
    assert fwd.domain == "srs.example.org"
    assert rw.srs_forward(fwd) == fwd
    assert str(rw.srs_reverse(fwd)) == "joe@orig.test"
    assert rw.srs_reverse(a("plain@srs.example.org")) == a("plain@srs.example.org")


# -- headers --------------------------------------------------------------------------
def old_to_new(x: Address) -> Address | None:
    return Address(x.local, "example.org") if x.domain == "old.example" else None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (' "Doe, John" <john@old.example>', ' "Doe, John" <john@example.org>'),
        (' "Say \\"hi\\", Bob" <bob@old.example>', ' "Say \\"hi\\", Bob" <bob@example.org>'),
        (
            " =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jm@old.example>",
            " =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jm@example.org>",
        ),
        (
            " Team: a@old.example, b@other.test;, c@old.example (Carol)",
            " Team: a@example.org, b@other.test;, c@example.org (Carol)",
        ),
        (
            ' x@other.test,\r\n\t"old.example" <y@old.example>',
            ' x@other.test,\r\n\t"old.example" <y@example.org>',
        ),
        (" <@relay.test:z@old.example>", " <@relay.test:z@example.org>"),
    ],
)
def test_header_values_change_only_address_parts(value: str, expected: str) -> None:
    assert rewrite_value(value, old_to_new) == expected


@pytest.mark.parametrize(
    "value",
    [
        " someone@other.test",  # must not match
        ' "john@old.example" <john@other.test>',  # the look-alike is a display name
        " undisclosed-recipients:;",
        " broken <<x@old.example>",  # not readable with certainty: left alone
        " (comment only)",
    ],
)
def test_header_values_left_alone(value: str) -> None:
    assert rewrite_value(value, old_to_new) is None


def test_headers_of_a_message_only_address_fields_and_bytes_kept() -> None:
    wire = (
        b"Received: from x by y; Sun, 22 Nov 2026 08:00:00 +0000\r\n"
        b'From: "Doe, John" <john@old.example>\r\n'
        b"To: a@old.example,\r\n b@other.test\r\n"
        b"Subject: mail for john@old.example\r\n"
        b"X-Note: john@old.example\r\n"
        b"\r\n"
        b"From: body@old.example stays\r\n"
    )
    out, n = rewrite_headers(wire, old_to_new, old_to_new)
    assert n == 2
    assert out == wire.replace(b"<john@old.example>", b"<john@example.org>").replace(
        b"To: a@old.example", b"To: a@example.org"
    )
    untouched, n = rewrite_headers(wire, lambda x: None, lambda x: None)
    assert n == 0 and untouched is wire


def test_header_rewrite_never_injects_lines() -> None:
    def evil(x: Address) -> Address | None:
        return Address("a\r\nBcc: x", "example.org")

    wire = b"From: j@old.example\r\n\r\nbody\r\n"
    out, n = rewrite_headers(wire, evil, None)
    assert n == 0 and out == wire


@pytest.mark.parametrize(
    "value",
    [
        " a@old.example",
        " John Doe <john@old.example>, b@other.test",
        "\r\n\tx@old.example ,y@old.example",
    ],
)
def test_plain_values_need_no_library_and_read_as_it_does(value: str) -> None:
    """A plain value is rewritten without the email package's parser, and exactly as
    that parser reads it (the cross-check, forced by a comment, gives the same)."""
    assert plain(value)
    assert rewrite_value(value, old_to_new) == rewrite_value(value + " ()", old_to_new)[:-3]  # type: ignore[index]


@pytest.mark.parametrize(
    "value",
    [' "a" <a@old.example>', " a@old.example (c)", " g: a@old.example;", " a.b <a@old.example>"],
)
def test_values_with_quotes_comments_groups_or_dotted_names_are_not_plain(value: str) -> None:
    assert not plain(value)


def test_a_value_of_more_comments_than_the_bound_is_left_alone() -> None:
    bounded = " a@old.example " + "(c)" * MAX_COMMENTS
    assert rewrite_value(bounded, old_to_new) == bounded.replace("old.example", "example.org")
    assert rewrite_value(bounded + "(c)", old_to_new) is None
    nested = " a@old.example " + "(" * 2000 + ")" * 2000  # once a RecursionError
    assert rewrite_value(nested, old_to_new) is None


def test_the_library_reads_at_most_one_budget_of_each_message() -> None:
    """Values the library must confirm share one budget per message; past it, fields
    are left as they were. Plain ones cost none of it."""
    value = ' "x" <a@old.example>'  # quoted: not plain
    fields = b"".join(b"To:" + value.encode() + b"\r\n" for _ in range(300))
    plains = b"Cc: a@old.example\r\n" * 500
    out, n = rewrite_headers(fields + plains + b"\r\nbody\r\n", old_to_new, old_to_new)
    assert n == LIBRARY_BUDGET // len(value) + 500
    assert out.count(b"<a@example.org>") == LIBRARY_BUDGET // len(value)


def test_the_rewriter_reads_at_most_max_addresses_of_each_message() -> None:
    plains = b"Cc: a@old.example, b@old.example\r\n" * (MAX_ADDRESSES // 2 + 100)
    out, n = rewrite_headers(plains + b"\r\nbody\r\n", old_to_new, old_to_new)
    assert n == MAX_ADDRESSES // 2
    assert out.count(b"@example.org") == MAX_ADDRESSES
