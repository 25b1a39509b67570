"""The rewrite stages in their order (gateway/rewrite/engine.py): aliases, masquerading,
canonical maps and SRS (pure logic; the SMTP path is in
tests/integration/test_rewrite.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.rewrite.engine import AliasLoop, Rewriter
from gateway.rewrite.options import RewriteOptions
from tests.unit.rewrite.helpers import a


def rewriter(tmp: Path | None = None, **opts: Any) -> Rewriter:
    return Rewriter(RewriteOptions.model_validate(opts), tmp or Path("."))


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


def test_srs_stage_leaves_our_own_domain_alone() -> None:
    rw = rewriter(srs={"enabled": True, "domain": "srs.example.org", "secrets": ["k"]})
    fwd = rw.srs_forward(a("joe@orig.test"))
    assert fwd.domain == "srs.example.org"
    assert rw.srs_forward(fwd) == fwd
    assert str(rw.srs_reverse(fwd)) == "joe@orig.test"
    assert rw.srs_reverse(a("plain@srs.example.org")) == a("plain@srs.example.org")
