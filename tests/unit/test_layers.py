"""The dependency contract between the gateway's parts, checked on the source.

Every import counts, at module level or inside a function (a function-level import
once hid a cycle between the SMTP package and the backend client):

- `gateway.vocab` (stages, actions, verdicts, results) imports nothing of the gateway;
- the pipeline and the checks never import the SMTP front end or the backend client;
- the backend client (`gateway.forward`) never imports checks, pipeline or SMTP;
- the checks' typed facts (`gateway.facts`) import only the vocabulary, and the
  settings (`gateway.config`) none of the parts that read them;
- nothing below the application imports it (`app`, `cli`);
- and no two parts import each other, directly or through others.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "gateway"
TOP = {"gateway.app", "gateway.cli", "gateway.__main__", "gateway.explain"}


def _part(module: str) -> str:
    """gateway.smtp.session -> gateway.smtp; gateway.wire -> gateway.wire."""
    return ".".join(module.split(".")[:2])


def _imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(("gateway", *parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "gateway":
                    targets = [f"gateway.{a.name}" for a in node.names]
                elif node.module.startswith("gateway."):
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("gateway.")]
            for t in targets:
                if _part(t) != _part(module):
                    edges[_part(module)].add(_part(t))
    return edges


EDGES = _imports()


def test_the_contract_sees_the_imports() -> None:
    """The reader finds what is there (an empty graph would pass every rule)."""
    assert "gateway.forward" in EDGES["gateway.smtp"]
    assert "gateway.vocab" in EDGES["gateway.checks"]


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [
        ("gateway.vocab", {p for p in EDGES} | {t for ts in EDGES.values() for t in ts}),
        ("gateway.pipeline", {"gateway.smtp", "gateway.forward", *TOP}),
        ("gateway.checks", {"gateway.smtp", "gateway.forward", "gateway.pipeline", *TOP}),
        ("gateway.forward", {"gateway.checks", "gateway.pipeline", "gateway.smtp", *TOP}),
        ("gateway.smtp", TOP),
        ("gateway.rewrite", {"gateway.checks", "gateway.pipeline", "gateway.smtp", *TOP}),
        # The checks' typed findings: words the checks share, below all of them.
        (
            "gateway.facts",
            (set(EDGES) | {t for ts in EDGES.values() for t in ts}) - {"gateway.vocab"},
        ),
        # Settings are plain data, read by every part and reading none of them.
        (
            "gateway.config",
            {"gateway.checks", "gateway.pipeline", "gateway.smtp", "gateway.forward", *TOP},
        ),
    ],
)
def test_imports_point_down(part: str, forbidden: set[str]) -> None:
    assert not EDGES[part] & forbidden, f"{part} imports {sorted(EDGES[part] & forbidden)}"


def test_no_two_parts_import_each_other() -> None:
    """No cycle of any length (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in EDGES.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(EDGES):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_a_reply_code_becomes_an_action_in_one_place() -> None:
    from gateway.vocab import Action, action_of_code

    assert [action_of_code(c) for c in (250, 251, 354, 421, 451, 550, 554)] == [
        Action.ACCEPT, Action.ACCEPT, Action.TEMPFAIL, Action.TEMPFAIL, Action.TEMPFAIL,
        Action.REJECT, Action.REJECT,
    ]  # fmt: skip
