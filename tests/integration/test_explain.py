"""`smtp-gateway check`: the offline explanation of a verdict."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.dkimkeys import rsa_key, sign
from tests.support.dnsserver import DnsServer
from tests.support.procs import check_command

MSG = (
    b"From: Alice <alice@signed.test>\nTo: bob@example.test\nSubject: hi\n"
    b"Date: Sun, 22 Nov 2026 08:00:00 +0000\nMessage-ID: <2@signed.test>\n\nHello.\n"
)


def run_check(tmp_path: Path, dns: DnsServer, message: bytes, *args: str) -> dict:
    r = check_command(
        tmp_path, message, *args, "--json", dns={"nameservers": [dns.address], "timeout": 0.5}
    )
    out = dict(json.loads(r.stdout))
    # The verdict is the exit status too: 0 accept, 3 tag, 4 quarantine, 5 tempfail, 6 reject.
    assert (
        r.returncode
        == {"accept": 0, "tag": 3, "quarantine": 4, "tempfail": 5, "reject": 6}[out["action"]]
    ), r.stderr
    return out


def test_check_explains_a_dmarc_rejection(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.add(
        {
            "_dmarc.signed.test": [("TXT", "v=DMARC1; p=reject")],
            "elsewhere.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        }
    )
    out = run_check(
        tmp_path,
        dns_server,
        MSG,
        "--mail-from",
        "x@elsewhere.test",
        "--rcpt",
        "bob@example.test",
        "--rcpt",
        "eve@remote.test",
    )
    assert out["action"] == "reject" and out["deciding_symbol"] == "dmarc.reject"
    assert out["reply"].startswith("550 5.7.1") and "DMARC" in out["reply"]
    assert out["refused_at"] == "data"
    by_stage = {s["stage"]: s for s in out["stages"]}
    assert by_stage["mail"]["symbols"] == ["spf.pass"]
    assert by_stage["rcpt <eve@remote.test>"]["symbols"] == ["relay.denied"]
    methods = {r["method"]: r["result"] for r in out["results"]}
    assert methods == {"spf": "pass", "dkim": "none", "arc": "none", "dmarc": "fail"}
    assert "dmarc=fail" in out["authentication_results"]
    assert out["authentication_results"].startswith("Authentication-Results: mx.gw.test;")


def test_check_explains_a_pass(tmp_path: Path, dns_server: DnsServer) -> None:
    key = rsa_key()
    dns_server.add(
        {
            "_dmarc.signed.test": [("TXT", "v=DMARC1; p=reject")],
            "k._domainkey.signed.test": [("TXT", key.dns)],
        }
    )
    signed = sign(MSG.replace(b"\n", b"\r\n"), key, "signed.test", "k")
    out = run_check(
        tmp_path,
        dns_server,
        signed,
        "--mail-from",
        "x@elsewhere.test",
        "--rcpt",
        "bob@example.test",
    )
    assert out["action"] == "accept" and out["reply"].startswith("250")
    methods = {r["method"]: r["result"] for r in out["results"]}
    assert methods["dkim"] == "pass" and methods["dmarc"] == "pass"
