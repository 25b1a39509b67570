"""A peak the backend cannot keep up with: does the gateway stay up, and lose nothing?

Hundreds of clients each send one large message at the same moment, declaring
its SIZE= as MTAs do, to a backend that takes a second per message (smtp-sink
`-W .:1`). A before-queue gateway holds every message in memory until the
backend answers, so this is the case that would take its memory past a
container's limit. It is run three times, in the same minute or two:

- *guarded*: the two guards, set small so the peak exceeds them:
  `limits.max_data_memory` (message data held at once; a MAIL whose SIZE=
  does not fit in what is left waits its turn for room, up to
  `limits.data_memory_wait`, its default 30 s, then gets 452 4.3.1; a message
  that outgrows what is left is discarded and gets 452 4.3.1 at its end) and
  `backend.max_sessions` (sessions open to the backend; beyond, a transaction
  waits for one, then 451 4.4.5);
- *guarded, no wait*: the same with `data_memory_wait: 0`: a MAIL that does
  not fit is refused at once;
- *unguarded*: both off (a budget larger than the burst, no session cap).

For each: the replies the clients got, by code and enhanced code; messages
delivered by the gateway's count; its peak resident memory (one worker,
sampled every 10 ms); how many MAILs waited for memory, and how many
transactions for a backend session;
whether its circuit breaker opened; the time the burst took. Every client's
message must end in a 250 (the gateway counted it delivered) or a 4xx (the
client retries): a 5xx, a lost connection or a mismatch between 250s and
deliveries stops the run.

Usage: python bench/peak.py [--clients 200] [--size 2000000] [--json FILE]
Needs Debian's `postfix` package for smtp-sink (no Postfix runs).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import free_port, tool, wait_for_greeting  # noqa: E402

MB = 1_000_000
GUARD_MEMORY = 16 * MB
GUARD_SESSIONS = 16


def start_slow_sink(port: int, sessions: int) -> subprocess.Popen[bytes]:
    """smtp-sink answering each message after a second (a backend that scans
    content, say), `sessions` at a time (more would wait in the kernel's queue)."""
    cmd = [tool("smtp-sink"), "-W", ".:1", "-m", str(sessions), f"127.0.0.1:{port}", "1024"]
    if os.geteuid() == 0:
        cmd[1:1] = ["-u", "nobody"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


CASES = ("guarded", "guarded, no wait", "unguarded")


def start_gateway(workdir: Path, sink_port: int, case: str, size: int) -> tuple[Any, int, int]:
    import yaml

    port, metrics_port = free_port(), free_port()
    limits: dict[str, Any] = {"max_message_size": size + 64 * 1024}
    backend: dict[str, Any] = {
        "url": f"smtp://127.0.0.1:{sink_port}",
        "xclient": False,
        "connect_timeout": 10,
        "data_timeout": 120,
    }
    if case != "unguarded":
        limits["max_data_memory"] = GUARD_MEMORY
        backend["max_sessions"] = GUARD_SESSIONS
        if case == "guarded, no wait":
            limits["data_memory_wait"] = 0
    else:
        limits["max_data_memory"] = 8 * 1024 * MB
        backend["max_sessions"] = None
    cfg = {
        "hostname": "gw.bench",
        "listeners": [
            {"name": "smtp", "address": "127.0.0.1", "port": port, "max_connections": 5000}
        ],
        "local_domains": ["bench.test"],
        "trusted_networks": [],
        "limits": limits,
        "backend": backend,
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "logging": {"level": "WARNING"},
        "policy": str(HERE / "proxy-policy.yaml"),
        "workers": 1,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(workdir / "gateway.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(path)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    wait_for_greeting(port, proc, f"gateway did not start; see {workdir / 'gateway.log'}")
    return proc, port, metrics_port


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def scrape(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        text = r.read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith('smtp_gateway_transactions_total{outcome="delivered"'):
            out["delivered"] += float(value)
        elif name.startswith("smtp_gateway_backend_session_waits_total{"):
            out["waits"] += float(value)
        elif name.startswith("smtp_gateway_message_memory_waits_total{"):
            out["memory_waits"] += float(value)
        elif name.startswith("smtp_gateway_backend_circuit_open"):
            out["circuit_open"] = max(out["circuit_open"], float(value))
    return out


async def _reply(r: asyncio.StreamReader) -> str:
    text = []
    while True:
        line = await r.readline()
        if not line:
            return "closed"
        text.append(line.decode(errors="replace").rstrip())
        if line[3:4] != b"-":
            return text[-1]


async def one_client(port: int, body: bytes, start: asyncio.Event) -> str:
    """One message; its final reply as `code enhanced` (or how it ended)."""
    await start.wait()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        return f"connect failed: {e}"
    try:
        if not (await _reply(r)).startswith("220"):
            return "no greeting"
        for cmd, want in (
            (b"EHLO peak.test", "250"),
            # SIZE=, as MTAs declare it when the server offers SIZE (RFC 1870).
            (b"MAIL FROM:<peak@src.test> SIZE=%d" % len(body), "250"),
            (b"RCPT TO:<user@bench.test>", "250"),
            (b"DATA", "354"),
        ):
            w.write(cmd + b"\r\n")
            reply = await _reply(r)
            if not reply.startswith(want):
                return " ".join(reply.split()[:2]) + f" (at {cmd.split()[0].decode()})"
        w.write(body)
        await w.drain()
        reply = await _reply(r)
        w.write(b"QUIT\r\n")
        return " ".join(reply.split()[:2])
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        return f"lost: {e}"
    finally:
        w.close()


async def burst(port: int, clients: int, body: bytes) -> list[str]:
    start = asyncio.Event()
    tasks = [asyncio.create_task(one_client(port, body, start)) for _ in range(clients)]
    await asyncio.sleep(0)
    start.set()
    return list(await asyncio.gather(*tasks))


def run_case(case: str, clients: int, size: int, workdir: Path) -> dict[str, Any]:
    sink_port = free_port()
    sink = start_slow_sink(sink_port, 256)
    gw = None
    try:
        wait_for_greeting(sink_port, sink, "smtp-sink did not start")
        gw, port, metrics_port = start_gateway(workdir, sink_port, case, size)
        line = b"x" * 998 + b"\r\n"
        body = b"Subject: peak\r\n\r\n" + line * (size // 1000) + b".\r\n"
        base = rss_kb(gw.pid)
        peak = base
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_kb(gw.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        replies = asyncio.run(burst(port, clients, body))
        elapsed = time.monotonic() - t0
        done.set()
        sampler.join()
        m = scrape(metrics_port)  # one worker: a scrape flushes its figures, so they are exact
    finally:
        if gw is not None:
            gw.terminate()
            gw.wait(30)
        sink.terminate()
        sink.wait(10)
    counts = collections.Counter(replies)
    ok = sum(n for k, n in counts.items() if k.startswith("250"))
    bad = {k: n for k, n in counts.items() if not (k.startswith("250") or k.startswith("4"))}
    if bad or ok != m["delivered"]:
        sys.exit(f"peak ({case}): {dict(counts)}; gateway counted {m['delivered']} delivered")
    return {
        "case": case,
        "replies": dict(counts.most_common()),
        "delivered": int(m["delivered"]),
        "rss_base_mb": round(base / 1024),
        "rss_peak_mb": round(peak / 1024),
        "circuit_opened": bool(m["circuit_open"]),
        "session_waits": int(m["waits"]),
        "memory_waits": int(m["memory_waits"]),
        "seconds": round(elapsed, 1),
    }


def measure_peak(clients: int, size: int, tmp: Path) -> dict[str, Any]:
    cases = [run_case(case, clients, size, tmp / f"peak-{i}") for i, case in enumerate(CASES)]
    return {"clients": clients, "size": size, "cases": cases}


def print_peak(res: dict[str, Any]) -> None:
    clients, size = res["clients"], res["size"]
    print(
        f"\npeak: {clients} clients x {size / MB:g} MB at once ({clients * size / MB:g} MB),"
        f" backend 1 s per message; one worker; guarded: max_data_memory {GUARD_MEMORY / MB:g} MB,"
        f" max_sessions {GUARD_SESSIONS}"
    )
    print(
        "| case | replies | delivered | RSS MB (idle -> peak) | waited for memory"
        " | waited for a backend session | breaker opened | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in res["cases"]:
        replies = ", ".join(f"{k}: {n}" for k, n in r["replies"].items())
        print(
            f"| {r['case']} | {replies} | {r['delivered']} | {r['rss_base_mb']} -> "
            f"{r['rss_peak_mb']} | {r['memory_waits']} | {r['session_waits']}"
            f" | {'yes' if r['circuit_opened'] else 'no'}"
            f" | {r['seconds']} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--size", type=int, default=2 * MB)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = measure_peak(args.clients, args.size, Path(tmp))
    print_peak(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
