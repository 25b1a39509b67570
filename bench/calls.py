#!/usr/bin/env python3
"""Python function calls per message: a figure that does not move with the machine.

Throughput and CPU time on a shared two-core machine vary by ±10% between runs of
the same code, which hides most single changes to the hot path. The number of
Python-level calls the gateway makes per message does not vary, and on this code
fewer calls has meant less CPU. So this runs the gateway (one worker) under
cProfile twice, with N and then 2N messages of the small shape from smtp-source,
and divides the difference by N: start-up, warm-up and shutdown cancel out.
(cProfile counts each resumption of a coroutine as a call of it: a wait costs one.)

Usage: python bench/calls.py [--modes proxy,policy] [--messages 1000] [--top 15]
Needs Debian's `postfix` package for smtp-source and smtp-sink (no Postfix runs).
"""

from __future__ import annotations

import argparse
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run  # noqa: E402  (bench/run.py: the harness)
from bench_site import BENCH_ZONE  # noqa: E402

from tests.support.dnsserver import DnsServer  # noqa: E402

Calls = dict[str, int]


def _profile(
    workdir: Path, sink_port: int, preset: str, dns: str, shape: dict[str, Any], n: int
) -> tuple[int, Calls]:
    """Total calls and calls per function of one gateway life that relayed n messages."""
    prof = workdir / "gateway.prof"
    g = run.GatewayProc(
        workdir, sink_port, preset, 1, dns=dns, python_args=("-m", "cProfile", "-o", str(prof))
    )
    try:
        run.run_source(g.port, shape, 50)  # pools and caches warm, in both lives alike
        run.run_source(g.port, shape, n)
    finally:
        g.stop()  # SIGTERM: the gateway drains and exits, and cProfile writes the file
    stats: Any = pstats.Stats(str(prof))
    per_function = {
        f"{Path(file).name}:{line}({name})": calls[1]
        for (file, line, name), calls in stats.stats.items()
    }
    return int(stats.total_calls), per_function


def measure(
    mode: str,
    n: int,
    sink_port: int,
    dns: str,
    tmp: Path,
    shape: dict[str, Any],
    scanners: run.Scanners | None = None,
) -> Any:
    preset = run.mode_policy(mode, tmp, scanners)
    total1, f1 = _profile(tmp / f"{mode}-1", sink_port, preset, dns, shape, n)
    total2, f2 = _profile(tmp / f"{mode}-2", sink_port, preset, dns, shape, 2 * n)
    per_fn = {k: (v - f1.get(k, 0)) / n for k, v in f2.items()}
    return {
        "mode": mode,
        "messages": n,
        "calls_per_message": (total2 - total1) / n,
        "functions": dict(sorted(per_fn.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="proxy,policy")
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--top", type=int, default=15, help="functions listed per mode")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gw-calls-"))
    shape = dict(run.SHAPES["small"])
    shape["file"] = run.signed_messages(tmp)[shape["size"]]
    sink_port = run.free_port()
    sink = run.start_sink(sink_port)
    dns = DnsServer(BENCH_ZONE)
    results = []
    scanners: run.Scanners | None = None
    try:
        time.sleep(0.2)  # smtp-sink has no readiness signal; smtp-source retries anyway
        if "scanning" in args.modes.split(","):
            scanners = run.Scanners(tmp / "scanners", dns.address)
        for mode in args.modes.split(","):
            r = measure(mode, args.messages, sink_port, dns.address, tmp, shape, scanners)
            results.append(r)
            print(f"\n{mode}: {r['calls_per_message']:.0f} Python calls per message")
            for name, calls in list(r["functions"].items())[: args.top]:
                print(f"  {calls:7.1f}  {name}")
    finally:
        if scanners is not None:
            scanners.stop()
        sink.terminate()
        dns.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
