"""CPU cost of each check per message, measured in isolation.

Builds every check the registry knows with a benchmark configuration, runs it
at each of its stages on a representative message context many times, and
reports microseconds of CPU per call. Later checks (SPF, DKIM, ...) join the
table by joining the registry; async checks run on one event loop with their
caches warm, which is the steady state the throughput figures see.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import TYPE_CHECKING, Any

from gateway import config
from gateway.address import parse_path
from gateway.checks.registry import build_checks
from gateway.context import Context
from gateway.pipeline import policy as policy_mod
from gateway.store.memory import MemoryStore
from gateway.vocab import Stage

if TYPE_CHECKING:
    from tests.support.dnsserver import DnsServer

MESSAGE = (
    b"From: Sender <sender@src.test>\r\nTo: user@bench.test\r\nSubject: bench\r\n"
    b"Message-ID: <1@src.test>\r\n\r\n" + b"x" * 70 + b"\r\n"
) * 1


def context(message: bytes) -> Context:
    ctx = Context("benchsession", "127.0.0.1", 40000, "smtp", helo="client.src.test")
    ctx.mail_from = parse_path("<sender@src.test>")
    ctx.rcpt = parse_path("<user@bench.test>")
    ctx.recipients = [ctx.rcpt]
    ctx.wire = message
    return ctx


async def _time_check(check: Any, stage: Stage, n: int, message: bytes) -> float:
    ctx = context(message)
    for _ in range(50):  # warm caches
        r = check.run(stage, ctx)
        if inspect.isawaitable(r):
            await r
    start = time.process_time()
    for _ in range(n):
        r = check.run(stage, ctx)
        if inspect.isawaitable(r):
            await r
    return (time.process_time() - start) / n * 1e6


def arc_sealed(message: bytes, dns: DnsServer, hops: int = 2) -> bytes:
    """`message` as `hops` forwarders in turn would seal it (ARC, RFC 8617), their
    key published on `dns`: what a message from a mailing list looks like."""
    import dkim

    from tests.support.dkimkeys import rsa_key

    key = rsa_key()
    for n in range(1, hops + 1):
        hop = f"hop{n}.test"
        dns.add({f"arc._domainkey.{hop}": [("TXT", key.dns)]})
        seen = "; arc=pass" if n > 1 else ""
        ar = f"Authentication-Results: {hop}; spf=pass smtp.mailfrom=src.test{seen}\r\n"
        message = ar.encode() + message
        sealed = dkim.arc_sign(message, b"arc", hop.encode(), key.private, hop.encode())
        message = b"".join(sealed) + message
    return message


def measure(dns: DnsServer, signed: bytes, n: int = 5000) -> list[dict[str, Any]]:
    """CPU per call of every check, on the benchmark's DKIM-signed message (`signed`,
    wire form). SPF twice: verdict cached (repeat sender) and evaluated in full by
    pyspf with the DNS answers cached (first message of a sender); DKIM on the
    signed message and on an unsigned one; ARC on the message unsealed and sealed
    by two forwarders.

    This is the check's own `run`; the runner adds its bookkeeping (a timer for a
    check that has to wait, the check and stage histograms) on top."""
    from gateway.dns import Resolver

    settings = config.load(None, env={})
    settings = settings.model_copy(
        update={
            "local_domains": ["bench.test"],
            "dns": config.Dns(nameservers=[dns.address]),
        }
    )
    from bench_site import SITE

    options = policy_mod.Policy.model_validate(SITE).checks
    rows = []
    for check in build_checks(settings, Resolver(settings.dns), MemoryStore()):
        configure = getattr(check, "configure", None)
        opts = getattr(options, check.name, None)
        if configure is not None and opts is not None:
            configure(opts)  # the bench site's zone and limits, as the runner does
        variants: list[tuple[str, float | None, bytes]] = [("", None, signed)]
        if check.name == "spf":
            variants = [
                (" (verdict cached)", 60.0, signed),
                (" (evaluated, DNS cached)", 0.0, signed),
            ]
        elif check.name == "dkim":
            variants = [(" (signed, 4 KB)", None, signed), (" (unsigned)", None, MESSAGE)]
        elif check.name == "arc":
            sealed = arc_sealed(signed, dns)
            variants = [(" (unsealed)", None, signed), (" (sealed, 2 hops, 4 KB)", None, sealed)]
        for label, ttl, message in variants:
            if ttl is not None:
                check.cache_ttl = ttl  # type: ignore[attr-defined]
                check._cache.clear()  # type: ignore[attr-defined]
            for stage in sorted(check.stages, key=list(Stage).index):
                us = asyncio.run(_time_check(check, stage, n if ttl != 0.0 else n // 10, message))
                rows.append({"check": check.name + label, "stage": stage.value, "us_per_call": us})
    return rows


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tempfile

    from bench_site import BENCH_ZONE
    from run import signed_messages

    from tests.support.dnsserver import DnsServer

    wire = signed_messages(Path(tempfile.mkdtemp()))[4096].read_bytes().replace(b"\n", b"\r\n")
    server = DnsServer(BENCH_ZONE)
    print("| check | stage | CPU µs per call |")
    print("|---|---|---|")
    for row in measure(server, wire):
        print(f"| {row['check']} | {row['stage']} | {row['us_per_call']:.2f} |")
    server.close()
