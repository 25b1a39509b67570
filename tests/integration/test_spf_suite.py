"""The openspf RFC 7208 test suite through our SPF entry point.

The suite is vendored (tests/data/spf, from the pyspf 2.0.14 source
distribution, with its licence), its zone data is served by the loopback DNS
server, and every case goes through SpfCheck.evaluate,
the function the gateway uses, with our resolver and cache in between.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config
from gateway.checks.spf import SpfCheck
from gateway.dns import Resolver
from tests.support.dnsserver import DnsServer

# Cases whose expectation we knowingly do not meet, with the reason. Empty: all pass.
KNOWN_DIFFERENCES: dict[str, str] = {}


SUITE = Path(__file__).resolve().parents[1] / "data" / "spf" / "rfc7208-tests.yml"


@pytest.fixture(scope="module")
def suite() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(SUITE.read_bytes()))


def zone_for(data: dict[str, Any]) -> dict[str, list[tuple[str, Any]]]:
    """The suite's zonedata as DnsServer records, with its conventions: SPF records
    double as TXT unless the name has TXT of its own; 'NONE' means no such record."""
    zone: dict[str, list[tuple[str, Any]]] = {}
    for name, records in data["zonedata"].items():
        out: list[tuple[str, Any]] = []
        has_txt = any(isinstance(r, dict) and "TXT" in r for r in records)
        for rec in records:
            if rec == "TIMEOUT":
                out.append(("TIMEOUT", ""))
                continue
            for t, v in rec.items():
                if v == "NONE" or v == ["NONE"]:
                    continue
                if t in ("TXT", "SPF"):
                    strings = tuple(s.encode("utf-8") for s in ([v] if isinstance(v, str) else v))
                    # A TXT record with no strings at all ("null-text") cannot exist on
                    # the wire (RFC 1035 3.3.14: one or more); serve its nearest legal
                    # form, one empty string, which SPF must likewise ignore.
                    strings = strings or (b"",)
                    out.append((t, strings))
                    if t == "SPF" and not has_txt:
                        out.append(("TXT", strings))
                elif t == "MX":
                    out.append(("MX", f"{v[0]} {v[1].rstrip('.')}."))
                elif t in ("PTR", "CNAME"):
                    out.append((t, v.rstrip(".") + "."))
                else:
                    out.append((t, str(v)))
        zone[name] = out
    return zone


def run_scenario(dns: DnsServer, data: dict[str, Any]) -> list[tuple[str, Any, str]]:
    dns.replace(zone_for(data))

    async def go() -> list[tuple[str, Any, str]]:
        check = SpfCheck(Resolver(config.Dns(nameservers=[dns.address], timeout=0.3)))
        check.cache_ttl = 0
        out = []
        for name, t in data["tests"].items():
            result, _why = await check.evaluate(t["host"], t["mailfrom"], t["helo"])
            out.append((name, t["result"], result))
        return out

    return asyncio.run(go())


def test_rfc7208_suite(suite: list[dict[str, Any]], dns_server: DnsServer) -> None:
    passed, failed = 0, []
    for scenario in suite:
        for name, expected, got in run_scenario(dns_server, scenario):
            ok = got == expected or (isinstance(expected, list) and got in expected)
            if ok:
                passed += 1
            elif name not in KNOWN_DIFFERENCES:
                failed.append(f"{name}: expected {expected}, got {got}")
    total = sum(len(s["tests"]) for s in suite)
    print(f"\nRFC 7208 suite: {passed}/{total} cases pass through SpfCheck.evaluate")
    assert not failed, "\n".join(failed)
    assert passed + len(KNOWN_DIFFERENCES) == total
