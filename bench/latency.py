"""Added per-message latency at a fixed, moderate rate (default 100 messages/s).

Each message is a fresh connection (greeting, EHLO, MAIL, RCPT, DATA, QUIT),
timed from connect to the final 250 for DATA. The same client measures the
direct path and the gateway, so the client's own cost cancels out in the
difference.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

BODY = b"Subject: latency probe\r\n\r\n" + b"x" * 70 + b"\r\n" * 50 + b".\r\n"


async def _reply(r: asyncio.StreamReader) -> int:
    while True:
        line = await r.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def one(port: int) -> float:
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await _reply(r) == 220
        for cmd in (
            b"EHLO probe.test",
            b"MAIL FROM:<probe@src.test>",
            b"RCPT TO:<user@bench.test>",
            b"DATA",
        ):
            w.write(cmd + b"\r\n")
            code = await _reply(r)
            assert code in (250, 354), (cmd, code)
        w.write(BODY)
        assert await _reply(r) == 250
        elapsed = time.perf_counter() - t0
        w.write(b"QUIT\r\n")
        await _reply(r)
        return elapsed
    finally:
        w.close()


async def run_rate(port: int, rate: int, seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(int(rate * seconds)):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(port)))
    return list(await asyncio.gather(*tasks))


def _pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50": 1000 * statistics.median(xs), "p99": 1000 * xs[int(0.99 * (len(xs) - 1))]}


def measure(
    direct_port: int, gateway_port: int, rate: int = 100, seconds: float = 10
) -> dict[str, Any]:
    asyncio.run(run_rate(gateway_port, rate, 1))  # warm up
    direct = _pct(asyncio.run(run_rate(direct_port, rate, seconds)))
    gateway = _pct(asyncio.run(run_rate(gateway_port, rate, seconds)))
    return {
        "rate": rate,
        "direct": direct,
        "gateway": gateway,
        "added_p50": gateway["p50"] - direct["p50"],
        "added_p99": gateway["p99"] - direct["p99"],
    }
