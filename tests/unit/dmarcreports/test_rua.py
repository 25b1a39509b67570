"""rua read within bounds, and the authorisation of outside destinations."""

from __future__ import annotations

import asyncio

import pytest

from gateway.dmarcreports.rua import Authorizer, Destination, destinations, org_domain
from tests.unit.fakes import TIMEOUT, DictResolver, txt


def test_mailto_uris_in_order_at_most_max_uris() -> None:
    rua = "https://x.test/r, mailto:a@one.test ,ftp://b, mailto:b@two.test,mailto:c@three.test"
    assert [d.address for d in destinations(rua, 2)] == ["a@one.test", "b@two.test"]
    assert [d.address for d in destinations(rua, 5)] == ["a@one.test", "b@two.test", "c@three.test"]


@pytest.mark.parametrize(
    ("uri", "limit"),
    [
        ("mailto:a@x.test!10", 10),
        ("mailto:a@x.test!10k", 10 << 10),
        ("MAILTO:a@x.test!2M", 2 << 20),
        ("mailto:a@x.test!1g", 1 << 30),
        ("mailto:a@x.test!1t", 1 << 40),
        ("mailto:a@x.test", None),
    ],
)
def test_size_limits_in_powers_of_two(uri: str, limit: int | None) -> None:
    assert destinations(uri, 2) == [Destination("a@x.test", "x.test", limit)]


@pytest.mark.parametrize(
    "uri",
    [
        "mailto:",
        "mailto:nobody",
        "mailto:a@localhost",  # no dot: not a domain mail can leave for
        "mailto:a@[192.0.2.1]",
        "mailto:@a.test:b@x.test",  # a source route
        "mailto:a@x.test!99999999999999999999",  # more digits than bounded
        "mailto:a b@x.test",
        "mailto:a%0d%0aRCPT TO:<c@d.test>@x.test",  # CR LF, once decoded
        "mailto:j\u00f6rg@x.test",
    ],
)
def test_what_does_not_parse_as_an_address_is_skipped(uri: str) -> None:
    assert destinations(uri + ",mailto:ok@y.test", 2) == [Destination("ok@y.test", "y.test")]


def test_headers_and_percent_encoding_and_repeats() -> None:
    got = destinations("mailto:a%2Bb@x.test?subject=hi,mailto:a%2bb@X.test,mailto:c@x.test", 2)
    assert [d.address for d in got] == ["a+b@x.test", "c@x.test"]


def test_only_the_first_entries_are_read() -> None:
    rua = ",".join(["junk"] * 40 + ["mailto:late@x.test"])
    assert destinations(rua, 2) == []


def test_org_domain_by_the_public_suffix_list() -> None:
    assert org_domain("mail.example.co.uk") == "example.co.uk"
    assert org_domain("a.b.sender.test") == "sender.test"


def check(resolver: DictResolver, policy: str, dest: str) -> str:
    d = Destination(f"r@{dest}", dest)
    return asyncio.run(Authorizer(resolver).check(policy, d))


def test_a_destination_in_the_same_organisation_needs_no_record() -> None:
    r = DictResolver({})
    assert check(r, "mail.own.test", "reports.own.test") == "ok"
    assert r.asked == []


def test_an_outside_destination_must_publish_its_consent() -> None:
    zone = {
        ("own.test._report._dmarc.reports.test", "TXT"): txt("v=DMARC1"),
        ("own.test._report._dmarc.spaced.test", "TXT"): txt("v = DMARC1 ; rua=x"),
        ("own.test._report._dmarc.other.test", "TXT"): txt("v=spf1 -all"),
    }
    r = DictResolver(zone, never=frozenset())
    assert check(r, "own.test", "reports.test") == "ok"
    assert check(r, "own.test", "spaced.test") == "ok"
    assert check(r, "own.test", "other.test") == "unauthorized"
    assert check(r, "own.test", "absent.test") == "unauthorized"
    assert ("own.test._report._dmarc.absent.test", "TXT") in r.asked


def test_a_failed_lookup_is_a_temperror_and_each_pair_is_asked_once_per_run() -> None:
    class Failing(DictResolver):
        async def query(self, name: str, rdtype: str):  # type: ignore[no-untyped-def]
            self.asked.append((name, rdtype))
            return TIMEOUT

    r = Failing({})
    auth = Authorizer(r)
    d = Destination("r@reports.test", "reports.test")

    async def twice() -> list[str]:
        return [await auth.check("own.test", d), await auth.check("own.test", d)]

    assert asyncio.run(twice()) == ["temperror", "temperror"]
    assert len(r.asked) == 1
