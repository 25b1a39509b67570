"""DNSBL/DNSWL through real SMTP sessions: client addresses from trusted PROXY headers
(documentation ranges, as data), zones served by the loopback DNS server."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from gateway.checks.dnsbl import code_matches, reverse_ip
from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient

ZONE = {
    "2.0.0.127.bl.test": [("A", "127.0.0.2")],
    "77.2.0.192.bl.test": [("A", "127.0.0.2"), ("TXT", "Listed: see https://bl.test/q")],
    "78.2.0.192.bl.test": [("A", "127.0.0.4")],
    "79.2.0.192.bl.test": [("A", "127.255.255.254")],
    "80.2.0.192.bl.test": [("A", "127.0.0.2")],
    "2.0.0.127.wl.test": [("A", "127.0.0.2")],
    "80.2.0.192.wl.test": [("A", "127.0.0.2")],
    "2.0.0.127.half.test": [("A", "127.0.0.2")],
    "81.2.0.192.half.test": [("A", "127.0.0.2")],
    "82.2.0.192.half.test": [("A", "127.0.0.2")],
    "2.0.0.127.half2.test": [("A", "127.0.0.2")],
    "81.2.0.192.half2.test": [("A", "127.0.0.2")],
    "2.0.0.127.slowbl.test": [("A", "127.0.0.2")],
    "83.2.0.192.slowbl.test": [("TIMEOUT", "")],
    "84.2.0.192.dead.test": [("A", "127.0.0.2")],  # no test entry: the zone is unhealthy
    "sender.test": [("TXT", "v=spf1 -all")],
}

ZONES = """
    zones:
      - {name: bl, zone: bl.test, weight: 1.0}
      - {name: wl, zone: wl.test, weight: -5.0}
      - {name: half, zone: half.test, weight: 0.5}
      - {name: half2, zone: half2.test, weight: 0.5}
      - {name: slow, zone: slowbl.test, weight: 1.0}
      - {name: dead, zone: dead.test, weight: 1.0}
"""


def policy(zones: str = ZONES, extra: str = "") -> str:
    return (
        "actions:\n  dnsbl.listed: reject\n  spf.fail: reject\n"
        "checks:\n  dkim: {enabled: false}\n  arc: {enabled: false}\n"
        "  dmarc: {enabled: false}\n  dnsbl:\n    deadline: 1\n" + zones + extra
    )


@pytest.fixture
def gw(
    backend: Backend, dns_server: DnsServer, gateway_factory: Callable[..., Gateway]
) -> Callable[..., Gateway]:
    dns_server.add(ZONE)

    def make(pol: str | None = None) -> Gateway:
        cfg = base_config(
            backend.url,
            trusted_networks=[],
            proxy_networks=["127.0.0.0/8"],
            dns={"nameservers": [dns_server.address], "timeout": 0.5},
        )
        cfg["listeners"][0]["proxy_protocol"] = True
        return gateway_factory(cfg, policy=pol or policy())

    return make


def connect(gw: Gateway, ip: str) -> tuple[RawClient, tuple[int, str]]:
    c = RawClient(gw.port())
    c.send(f"PROXY TCP4 {ip} 198.51.100.1 40000 25\r\n".encode())
    return c, c.reply()


def greeting(gw: Gateway, ip: str) -> tuple[int, str]:
    c, reply = connect(gw, ip)
    c.close()
    return reply


def test_listed_client_refused_naming_the_zone_unlisted_passes(
    gw: Callable[..., Gateway], dns_server: DnsServer
) -> None:
    g = gw()
    hit = 'smtp_gateway_dns_cache_total{result="hit"}'

    def asked() -> int:  # DNS questions about these two clients
        return sum(1 for n, _t in dns_server.queries if ".2.0.192." in n)

    # The second session of each client is answered from the DNS cache (the check
    # then runs synchronously): the same verdict and reason, each lookup counted
    # once, nothing asked again, and every answer counted as a cache hit.
    hits, questions = [], []
    for _ in range(2):
        hits.append(g.metric(hit))
        code, text = greeting(g, "192.0.2.77")
        assert code == 554 and "5.7.1" in text and "bl.test" in text and "Listed: see" in text
        assert greeting(g, "192.0.2.99")[0] == 220
        questions.append(asked())
    assert g.metric('smtp_gateway_dnsbl_lookups_total{result="listed",zone="bl"}') == 2
    assert g.metric('smtp_gateway_dnsbl_lookups_total{result="clean",zone="bl"}') == 2
    assert questions[0] >= 6 and questions[1] == questions[0]  # A per zone, TXT for bl
    assert g.metric(hit) - hits[1] == questions[0]


def test_after_a_554_greeting_the_gateway_waits_for_quit_answering_503(
    gw: Callable[..., Gateway],
) -> None:
    """RFC 5321 3.1: after 554 the server waits for QUIT and answers other commands
    with 503; bounded to a few commands, so a refused client cannot hold on."""
    g = gw()
    c, (code, _) = connect(g, "192.0.2.77")
    with c:
        assert code == 554
        assert c.cmd("EHLO client.test")[1].startswith("503 5.5.1 ")
        assert c.cmd("MAIL FROM:<a@sender.test>")[1].startswith("503 5.5.1 ")
        assert c.cmd("QUIT") == (221, "221 2.0.0 Bye")
        assert c.closed()
    c, (code, _) = connect(g, "192.0.2.77")
    with c:
        assert code == 554
        for _ in range(5):
            assert c.cmd("NOOP")[0] == 503
        assert c.closed()  # the sixth is not waited for


def test_reply_text_hides_the_zone(gw: Callable[..., Gateway]) -> None:
    zones = ZONES.replace(
        "{name: bl, zone: bl.test, weight: 1.0}",
        "{name: bl, zone: bl.test, weight: 1.0, reply_text: our paid list}",
    )
    code, text = greeting(gw(policy(zones)), "192.0.2.77")
    assert code == 554 and "our paid list" in text and "bl.test" not in text


def test_allowlisted_client_skips_block_list_and_sender_checks(
    gw: Callable[..., Gateway], dns_server: DnsServer
) -> None:
    g = gw()
    c, (code, _) = connect(g, "192.0.2.80")  # on bl (+1) and wl (-5)
    try:
        assert code == 220
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250  # spf -all would reject
    finally:
        c.close()
    assert dns_server.asked("sender.test", "TXT") == 0
    c, _ = connect(g, "192.0.2.99")
    try:
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 550  # not allow-listed: SPF applies
    finally:
        c.close()


def test_weights_combine_against_the_threshold(gw: Callable[..., Gateway]) -> None:
    g = gw()
    assert greeting(g, "192.0.2.81")[0] == 554  # half + half2 = 1.0
    assert greeting(g, "192.0.2.82")[0] == 220  # half only = 0.5


@pytest.mark.parametrize(
    ("codes", "listed"),
    [('["127.0.0.2"]', False), ('["127.0.0.4/30"]', True), ('["bitmask:0x04"]', True)],
)
def test_return_code_filters(gw: Callable[..., Gateway], codes: str, listed: bool) -> None:
    zones = ZONES.replace(
        "{name: bl, zone: bl.test, weight: 1.0}",
        "{name: bl, zone: bl.test, weight: 1.0, codes: " + codes + "}",
    )
    assert greeting(gw(policy(zones)), "192.0.2.78")[0] == (554 if listed else 220)


def test_error_codes_are_never_a_listing(gw: Callable[..., Gateway]) -> None:
    g = gw()
    assert greeting(g, "192.0.2.79")[0] == 220
    with urllib.request.urlopen(g.metrics_url + "/metrics") as r:
        text = r.read().decode()
    assert 'smtp_gateway_dnsbl_lookups_total{result="error",zone="bl"} 1.0' in text
    g.wait_log(lambda e: "error code, not a listing" in e.get("msg", ""))


def test_timing_out_zone_does_not_block_mail(gw: Callable[..., Gateway], backend: Backend) -> None:
    g = gw()
    c, (code, _) = connect(g, "192.0.2.83")
    try:
        assert code == 220
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@other.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        c.cmd("DATA")
        c.send(b"From: a@other.test\r\nSubject: t\r\n\r\nhi\r\n.\r\n")
        assert c.reply()[0] == 250
    finally:
        c.close()
    assert len(backend.messages()) == 1
    with urllib.request.urlopen(g.metrics_url + "/metrics") as r:
        text = r.read().decode()
    assert 'smtp_gateway_check_results_total{check="dnsbl",symbol="dnsbl.temperror"} 1.0' in text


def test_unhealthy_zone_is_skipped_and_reported(gw: Callable[..., Gateway]) -> None:
    g = gw()
    assert greeting(g, "192.0.2.84")[0] == 220  # listed only in the unhealthy zone
    with urllib.request.urlopen(g.metrics_url + "/healthz/ready") as r:
        body: dict[str, Any] = json.loads(r.read())
    assert body["dnsbl_zones_healthy"] == {
        "bl": True,
        "wl": True,
        "half": True,
        "half2": True,
        "slow": True,
        "dead": False,
    }
    with urllib.request.urlopen(g.metrics_url + "/metrics") as r:
        assert 'smtp_gateway_dnsbl_zone_healthy{zone="dead"} 0.0' in r.read().decode()


def test_reverse_and_filters_unit() -> None:
    assert reverse_ip("192.0.2.77") == "77.2.0.192"
    assert reverse_ip("2001:db8::1").startswith("1.0.0.0.") and reverse_ip("2001:db8::1").endswith(
        ".8.b.d.0.1.0.0.2"
    )
    assert reverse_ip("::ffff:192.0.2.1") == "1.2.0.192"
    assert reverse_ip("0:0:0:0:0:FFFF:c000:201") == "1.2.0.192"  # any spelling of it
    assert code_matches("127.0.0.2", [])
    assert not code_matches("127.0.0.3", ["127.0.0.2"])
    assert code_matches("127.0.0.10", ["127.0.0.8/29"])
    assert code_matches("127.0.0.6", ["bitmask:0x04"]) and not code_matches(
        "127.0.0.2", ["bitmask:0x04"]
    )


@pytest.mark.parametrize("warm", ["A of bl", "A of every zone"])
def test_half_cached_lookups_resume_with_what_the_cache_gave(
    dns_server: DnsServer, warm: str
) -> None:
    """A client whose answers are partly cached: bl's A answer only, or every A
    answer but not bl's TXT reason (bl comes last, so the synchronous pass has
    judged the other zones when it stops). The coroutine that takes over uses
    what the cache gave and reaches the verdict and reason of a cold lookup."""
    import asyncio

    from gateway import config
    from gateway.checks.dnsbl import DnsblCheck
    from gateway.context import Context
    from gateway.dns import Resolver
    from gateway.pipeline.policy import Policy
    from gateway.vocab import Stage

    dns_server.add(ZONE)
    zones = [{"name": n, "zone": f"{n}.test"} for n in ("half", "half2", "bl")]
    options = Policy.model_validate({"checks": {"dnsbl": {"zones": zones}}}).options("dnsbl")
    ip = "192.0.2.77"
    names = [f"77.2.0.192.{n}.test" for n in ("half", "half2", "bl")]

    async def go() -> tuple[bool, tuple[str, ...], dict[str, str]]:
        check = DnsblCheck(Resolver(config.Dns(nameservers=[dns_server.address], timeout=0.5)))
        check = check.configured(options)
        for name in names[2:] if warm == "A of bl" else names:
            await check.resolver.query(name, "A")
        ctx = Context("s1", ip, 25, "smtp")
        symbols = check.run(Stage.CONNECT, ctx)
        waited = not isinstance(symbols, tuple)
        if not isinstance(symbols, tuple):
            symbols = await symbols
        return waited, symbols, ctx.details

    waited, symbols, details = asyncio.run(go())
    assert waited and symbols == ("dnsbl.listed",)
    assert details["dnsbl.listed"] == "bl.test: Listed: see https://bl.test/q"
    for name in names:
        assert dns_server.asked(name, "A") == 1, name
    assert dns_server.asked(names[2], "TXT") == 1
