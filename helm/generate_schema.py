#!/usr/bin/env python3
"""Writes the gateway part of helm/smtp-gateway/values.schema.json from the
configuration's own pydantic models, so that `helm install` refuses what
`smtp-gateway config check` refuses: a typo in `gateway.limits` or
`gateway.extraConfig`, a value of the wrong type or out of range, a network that
is not one. The chart's own keys (image, service, ...) are written by hand in the
same file; this script replaces only the sections it owns.

    python helm/generate_schema.py          # rewrite the file
    python helm/generate_schema.py --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway import config  # noqa: E402

SCHEMA = ROOT / "helm" / "smtp-gateway" / "values.schema.json"
PREFIX = "config."  # definitions this script owns

# An IPv4 or IPv6 network as the gateway reads one ("192.0.2.0/24", "2001:db8::/32",
# or a single address); the gateway checks the rest.
NETWORK = {"type": "string", "pattern": r"^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$"}
# A domain or *.domain, with no empty label and no white space (config.py checks
# the rest: label lengths, IDNA).
DOMAIN = {"type": "string", "pattern": r"^(\*\.)?[^.\s*]+(\.[^.\s*]+)*$"}


def _clean(node: Any) -> Any:
    """pydantic's schema in the chart's dialect: refs to our definitions, no titles,
    networks with a pattern a validator enforces (a `format` it may not)."""
    if isinstance(node, list):
        return [_clean(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("format") in ("ipv4network", "ipv6network", "ipvanynetwork"):
        return dict(NETWORK)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "$ref":
            out[key] = "#/definitions/" + PREFIX + value.rsplit("/", 1)[1]
        else:
            out[key] = _clean(value)
    if "anyOf" in out:  # two network formats made one pattern twice
        unique = [json.loads(s) for s in dict.fromkeys(json.dumps(x) for x in out["anyOf"])]
        out["anyOf"] = unique
        if len(unique) == 1:
            out.update(out.pop("anyOf")[0])
    return out


def generate(current: dict[str, Any]) -> dict[str, Any]:
    settings = config.Settings.model_json_schema()
    defs = {f"{PREFIX}{name}": _clean(d) for name, d in settings.get("$defs", {}).items()}
    defs[f"{PREFIX}Settings"] = _clean({k: v for k, v in settings.items() if k != "$defs"})
    out = dict(current)
    out["definitions"] = {
        **{k: v for k, v in current.get("definitions", {}).items() if not k.startswith(PREFIX)},
        **dict(sorted(defs.items())),
    }
    gw = out["properties"]["gateway"]["properties"]
    gw["limits"] = {"$ref": f"#/definitions/{PREFIX}Limits"}
    gw["extraConfig"] = {"$ref": f"#/definitions/{PREFIX}Settings"}
    gw["trustedNetworks"] = {"type": "array", "items": dict(NETWORK)}
    gw["proxyNetworks"] = {"type": "array", "items": dict(NETWORK)}
    gw["localDomains"] = {"type": "array", "minItems": 1, "items": dict(DOMAIN)}
    return out


def main(argv: list[str]) -> int:
    current = json.loads(SCHEMA.read_text())
    text = json.dumps(generate(current), indent=2, ensure_ascii=False) + "\n"
    if "--check" in argv:
        if SCHEMA.read_text() != text:
            print(f"{SCHEMA} is stale: run python helm/generate_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
