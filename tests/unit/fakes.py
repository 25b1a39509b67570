"""Fakes the design allows in the unit tier: a resolver answering from a dict, a
clock the test moves, and a stream fed the bytes a peer would send (no socket)."""

from __future__ import annotations

import asyncio

from gateway import config
from gateway.dns import DnsAnswer, DnsStatus, Resolver
from gateway.stream import Stream


def txt(*records: str) -> DnsAnswer:
    return DnsAnswer(DnsStatus.OK, tuple((r.encode(),) for r in records), 300.0)


def a(*addresses: str) -> DnsAnswer:
    return DnsAnswer(DnsStatus.OK, addresses, 300.0)


NX = DnsAnswer(DnsStatus.NXDOMAIN, (), 60.0)
TIMEOUT = DnsAnswer(DnsStatus.TIMEOUT)


class DictResolver(Resolver):
    """Answers from `zone` ((name, type) -> answer; anything else NXDOMAIN), nothing
    cached until asked, as a real resolver starts; `never` names never answer."""

    def __init__(
        self,
        zone: dict[tuple[str, str], DnsAnswer],
        never: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        super().__init__(config.Dns(nameservers=["127.0.0.1:9"]))
        self.zone = {(n.lower(), t): ans for (n, t), ans in zone.items()}
        self.never = never
        self.asked: list[tuple[str, str]] = []
        self.known: dict[tuple[str, str], DnsAnswer] = {}

    def cached(self, name: str, rdtype: str) -> DnsAnswer | None:
        return self.known.get((name.lower().rstrip("."), rdtype))

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        key = (name.lower().rstrip("."), rdtype)
        self.asked.append(key)
        if key in self.never:
            await asyncio.Event().wait()
        ans = self.zone.get(key, NX)
        if not ans.temporary:
            self.known[key] = ans
        return ans


def fed(*chunks: bytes, eof: bool = True) -> Stream:
    """A stream that has received `chunks` (and the peer's end, with `eof`), as a
    transport would have delivered them."""
    s = Stream()
    for c in chunks:
        s.data_received(c)
    if eof:
        s.eof_received()
    return s


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class Clock:
    """A clock that moves only when the test moves it (`clock.t += seconds`): time
    passing without waiting for it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
