"""What a site adds to a policy preset for the benchmark: a DNSBL zone and limits.

The default preset cannot name a block list or a rate (both are site choices), so
the `policy` and `policy-cold` modes run the preset plus this overlay; a check
that needs site data joins the benchmark with one entry here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

# DNS for the bench domains, served on loopback (the sender is smtp-source's -f).
BENCH_ZONE: dict[str, list[tuple[str, Any]]] = {
    "src.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("A", "127.0.0.1")],
    "_dmarc.src.test": [("TXT", "v=DMARC1; p=reject")],
    "client.bench": [("A", "127.0.0.1")],
    # RFC 5782 test entry, so the zone passes its health check; 127.0.0.1 (the
    # benchmark's client) is not listed and each lookup is a real NXDOMAIN.
    "2.0.0.127.bl.bench": [("A", "127.0.0.2"), ("TXT", "test entry")],
}

SITE: dict[str, Any] = {
    "checks": {
        "dnsbl": {"zones": [{"name": "bench-bl", "zone": "bl.bench"}]},
        "ratelimit": {
            # Far above the benchmark's rate: every message pays for the lookup
            # and the update, none is refused.
            "limits": [
                {"name": "msgs_per_ip", "key": "client_ip", "rate": "10000000/minute"},
                {"name": "rcpts_per_sender", "key": "mail_from", "unit": "recipients",
                 "rate": "10000000/minute"},
            ],
            "concurrency": [{"name": "conns_per_ip", "key": "client_ip", "max": 100000}],
        },
    }
}  # fmt: skip


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def site_policy(preset: str, path: Path, extra: dict[str, Any] | None = None) -> str:
    """Write preset (a name from policies/ or a file) + SITE (+ `extra`, a mode's own
    additions) to `path`; return the path."""
    src = Path(preset) if preset.endswith(".yaml") else ROOT / "policies" / f"{preset}.yaml"
    data = yaml.safe_load(src.read_text()) or {}
    path.write_text(yaml.safe_dump(_merge(_merge(data, SITE), extra or {})))
    return str(path)
