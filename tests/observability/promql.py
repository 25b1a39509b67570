"""What a PromQL expression refers to, from its parse tree (promql-parser), not a grep."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import promql_parser

# Grafana's variables, replaced by what they stand for before parsing.
GRAFANA = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


@dataclass
class Refs:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    # The label list of every aggregation (`sum by (...)`) and every vector matching
    # (`and on (...)`), in order; `without` and `ignoring` lists start with "-".
    groupings: list[tuple[str, ...]] = field(default_factory=list)


def refs(expr: str) -> Refs:
    for k, v in GRAFANA.items():
        expr = expr.replace(k, v)
    out = Refs()
    _walk(promql_parser.parse(expr), out)
    return out


def _walk(node: Any, out: Refs) -> None:
    kind = type(node).__name__
    if kind == "VectorSelector":
        if node.name:
            out.metrics.add(node.name)
        for m in node.matchers.matchers:
            if m.name == "__name__":
                out.metrics.add(m.value)
            else:
                out.labels.add(m.name)
        return
    if kind == "MatrixSelector":
        _walk(node.vector_selector, out)
    elif kind == "Call":
        for a in node.args:
            _walk(a, out)
    elif kind == "AggregateExpr":
        if node.modifier is not None:
            out.labels.update(node.modifier.labels)
            without = "without" in str(node.modifier.type).lower()
            out.groupings.append(("-",) * without + tuple(node.modifier.labels))
        else:
            out.groupings.append(())
        _walk(node.expr, out)
        if node.param is not None:
            _walk(node.param, out)
    elif kind == "BinaryExpr":
        mod = node.modifier
        if mod is not None and mod.matching is not None:
            out.labels.update(mod.matching.labels)
            ignoring = "exclude" in str(mod.matching.type).lower()
            out.groupings.append(("-",) * ignoring + tuple(mod.matching.labels))
        _walk(node.lhs, out)
        _walk(node.rhs, out)
    elif kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
        _walk(node.expr, out)
    elif kind not in ("NumberLiteral", "StringLiteral"):
        raise AssertionError(f"PromQL node {kind} not understood by this test helper")
