#!/usr/bin/env python3
"""The benchmark: smtp-source -> (gateway) -> smtp-sink over loopback.

Modes, measured in the same run so the ratios are meaningful on a noisy machine:
  direct   smtp-source -> smtp-sink (the ceiling on this machine)
  floor    through bench/floor.py: the gateway's byte stream on uvloop relaying and
           nothing else, one process (the floor of this design; a yardstick)
  proxy    through the gateway, policy `bench/proxy-policy.yaml` (no optional checks)
  policy   through the gateway with the default preset plus bench/site.py's DNSBL
           zone and rate limits (every check that exists)
  scanning the policy mode plus content scanning: a real Rspamd and a real clamd
           (tests/support's, configured in the bench's temporary directory), each
           message sent to both; the scanners' own CPU is reported apart

Shapes: small (4 KB, 1 rcpt, 20 sessions, new connection per message), large
(100 KB, 5 rcpts), persistent (4 KB, many messages per connection: -d).

For each: messages/s (median of --repeat), ratio to direct (median of the
per-repeat ratios), CPU ms per message of the gateway processes (user+sys from
/proc), peak resident memory. Then the latency and idle-session figures, and
bench/peak.py's burst of large messages at a slow backend.

Usage: python bench/run.py [--repeat 3] [--scale 1.0] [--workers N] [--json FILE]
(--workers defaults to the gateway's own default: one per available CPU.)
Needs Debian's `postfix` package for smtp-source and smtp-sink (no Postfix runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")

SHAPES: dict[str, dict[str, Any]] = {
    "small": {"args": ["-s", "20"], "size": 4096, "messages": 12000},
    "large": {"args": ["-s", "20", "-r", "5"], "size": 102400, "messages": 3000},
    "persistent": {"args": ["-d", "-s", "20"], "size": 4096, "messages": 20000},
}
# The checks the `policy` modes run are those the preset enables, plus the site
# data in bench/site.py (a DNSBL zone and limits, which no preset can name).
MODES = {
    "proxy": str(HERE / "proxy-policy.yaml"),
    "policy": "default",
    "policy-cold": str(HERE / "cold-policy.yaml"),
    "scanning": "default",
}


def signed_messages(directory: Path) -> dict[int, Path]:
    """A DKIM-signed message per size (From and d= src.test), as smtp-source -F files.

    smtp-source appends CRLF to every line of the file, so the file has LF line ends;
    the signature is made over the CRLF form that goes on the wire.
    """
    from bench_site import BENCH_ZONE

    from tests.support.dkimkeys import rsa_key, sign

    key = rsa_key()
    BENCH_ZONE["bench._domainkey.src.test"] = [("TXT", key.dns)]
    out = {}
    for size in {s["size"] for s in SHAPES.values()}:
        head = (
            b"From: Sender <sender@src.test>\r\nTo: user@bench.test\r\n"
            b"Subject: benchmark\r\nDate: Sun, 22 Nov 2026 08:00:00 +0000\r\n"
            b"Message-ID: <bench@src.test>\r\n\r\n"
        )
        line = b"x" * 70 + b"\r\n"
        body = line * max(1, (size - len(head)) // len(line))
        wire = sign(head + body, key, "src.test", "bench")
        path = directory / f"message-{size}.eml"
        path.write_bytes(wire.replace(b"\r\n", b"\n"))
        out[size] = path
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if not path:
        sys.exit(f"{name} not found: apt-get install postfix (see bench/RESULTS.md)")
    return path


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (the gateway's workers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError):
            pass
    return total / TICK


def memory_kb(pids: list[int], key: str) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def start_sink(port: int) -> subprocess.Popen[bytes]:
    """smtp-sink on loopback, the benchmark's backend (no readiness signal: smtp-source
    retries its connections, so callers only give it a moment)."""
    cmd = [tool("smtp-sink"), "-m", "4096", f"127.0.0.1:{port}", "1024"]
    if os.geteuid() == 0:
        cmd[1:1] = ["-u", "nobody"]  # it refuses to run as root otherwise
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def mode_policy(mode: str, workdir: Path, scanners: Scanners | None = None) -> str:
    """The policy a gateway mode runs: the proxy's own file, or a preset plus the
    bench site's DNSBL zone and limits (and for `scanning`, the scanners), written
    into `workdir`."""
    from bench_site import site_policy

    preset = MODES[mode]
    if mode == "proxy":
        return preset
    extra = scanners.checks() if mode == "scanning" and scanners is not None else None
    return site_policy(preset, workdir / f"{mode}-policy.yaml", extra)


class Scanners:
    """A real clamd and a real Rspamd for the `scanning` mode (the tests' own
    servers: their configuration and signatures in `workdir`, nothing downloaded).

    clamd's database here is the tests' few signatures, not the official ones: its
    CPU per message is a floor; with the full database each scan costs clamd more,
    never the gateway."""

    def __init__(self, workdir: Path, dns: str) -> None:
        from tests.support.clamd import Clamd
        from tests.support.rspamd import RspamdServer

        self.clamd = Clamd(workdir / "clamd", stream_max=25 * 1024 * 1024)
        try:
            self.rspamd = RspamdServer(workdir / "rspamd", dns)
        except BaseException:
            self.clamd.stop()
            raise

    def checks(self) -> dict[str, Any]:
        return {
            "checks": {
                "clamav": {"enabled": True, "endpoint": self.clamd.tcp},
                "rspamd": {"enabled": True, "endpoint": self.rspamd.url},
            }
        }

    @property
    def pids(self) -> list[int]:
        out: list[int] = []
        for proc in (self.clamd.proc, self.rspamd.proc):
            if proc is not None:
                out += process_tree(proc.pid)
        return out

    def stop(self) -> None:
        self.clamd.stop()
        self.rspamd.stop()


def wait_for_greeting(port: int, proc: subprocess.Popen[bytes], failure: str) -> None:
    """Wait until a 220 greeting comes from `port` (the server has no readiness signal)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit(failure)
        time.sleep(0.05)


class GatewayProc:
    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        policy: str,
        workers: int,
        max_connections: int = 20000,
        dns: str | None = None,
        python_args: tuple[str, ...] = (),
        log_level: str = "INFO",
        pool_size: int = 64,
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.sent = 0  # messages sent through it, for settled()
        cfg = {
            "hostname": "gw.bench",
            "listeners": [
                {
                    "name": "smtp",
                    "address": "127.0.0.1",
                    "port": self.port,
                    "max_connections": max_connections,
                }
            ],
            "local_domains": ["bench.test"],
            "trusted_networks": [],
            # XFORWARD (pipelined with MAIL) as Postfix's own before-queue proxy does;
            # XCLIENT costs a round trip and a re-EHLO per new client. Each client
            # session has a backend session of its own, from pool_size spares.
            "backend": {
                "url": f"smtp://127.0.0.1:{sink_port}",
                "pool_size": pool_size,
                "xclient": False,
            },
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            # INFO, the default: a line per transaction and per session, as operators run it.
            "logging": {"level": log_level},
            "policy": policy,
            "workers": workers,
        }
        if dns:
            cold = policy.endswith("cold-policy.yaml")
            cfg["dns"] = {"nameservers": [dns], "cache_size": 0 if cold else 50000}
        import yaml

        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "gateway.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, *python_args, "-m", "gateway", "run", "--config", str(path)],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        failure = f"gateway did not start; see {workdir / 'gateway.log'}"
        wait_for_greeting(self.port, self.proc, failure)

    @property
    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def settled(self) -> dict[str, float]:
        """`delivered()` once it covers every message sent so far (`self.sent`): each
        worker writes its metrics within a second (gateway.metrics.FLUSH_INTERVAL), so
        scrape until two in a row agree and count them all."""
        deadline = time.monotonic() + 10
        last: dict[str, float] | None = None
        while True:
            now = self.delivered()
            if now == last and now["messages"] >= self.sent:
                return now
            if time.monotonic() > deadline:
                return now  # _verify reports the shortfall
            last = now
            time.sleep(0.1)

    def delivered(self) -> dict[str, float]:
        """What the gateway itself counted: messages, their bytes, DKIM passes. The
        bench checks these so it can never measure something other than it claims
        (an empty message, an unsigned one)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            text = r.read().decode()
        out = {"messages": 0.0, "bytes": 0.0, "dkim_pass": 0.0}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == "smtp_gateway_message_size_bytes_count":
                out["messages"] = float(value)
            elif name == "smtp_gateway_message_size_bytes_sum":
                out["bytes"] = float(value)
            elif name.startswith("smtp_gateway_check_results_total{") and (
                'symbol="dkim.pass"' in name
            ):
                out["dkim_pass"] += float(value)
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class FloorProc:
    """bench/floor.py, one process: the design's floor, for the `floor` mode."""

    def __init__(self, sink_port: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "floor.py"), str(self.port), str(sink_port)],
            stdout=subprocess.DEVNULL,
        )
        wait_for_greeting(self.port, self.proc, "bench/floor.py did not start")

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_source(port: int, shape: dict[str, Any], messages: int) -> float:
    args = [
        tool("smtp-source"),
        *shape["args"],
        "-F",
        str(shape["file"]),
        "-m",
        str(messages),
        "-f",
        "sender@src.test",
        "-t",
        "user@bench.test",
        "-M",
        "client.bench",
        f"127.0.0.1:{port}",
    ]
    start = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"smtp-source failed: {r.stderr}")
    return elapsed


def throughput(
    args: argparse.Namespace,
    sink_port: int,
    gateways: dict[str, GatewayProc | FloorProc],
    scanners: Scanners | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for shape_name, shape in SHAPES.items():
        if shape_name not in args.shapes:
            continue
        n = max(200, int(shape["messages"] * args.scale))
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in ["direct", *gateways]}
        for g in gateways.values():  # warm the pools and caches
            run_source(g.port, shape, 200)
            if isinstance(g, GatewayProc):
                g.sent += 200
        for _rep in range(args.repeat):
            for mode in samples:
                port = sink_port if mode == "direct" else gateways[mode].port
                proc = gateways.get(mode)
                pids = proc.pids if proc is not None else []
                gw = proc if isinstance(proc, GatewayProc) else None
                seen0 = gw.settled() if gw is not None else {}
                # The scanners' processes, apart from the gateway's (scanning mode).
                spids = scanners.pids if scanners is not None and mode == "scanning" else []
                cpu0, scpu0 = cpu_seconds(pids), cpu_seconds(spids)
                t = run_source(port, shape, n)
                cpu = cpu_seconds(pids) - cpu0
                sample = {"rate": n / t, "cpu_ms": 1000 * cpu / n}
                if spids:
                    sample["scanner_cpu_ms"] = 1000 * (cpu_seconds(spids) - scpu0) / n
                if gw is not None:
                    gw.sent += n
                    seen = gw.settled()
                    got = seen["messages"] - seen0["messages"]
                    sample["messages"] = got
                    sample["avg_bytes"] = (seen["bytes"] - seen0["bytes"]) / max(got, 1)
                    sample["dkim_pass"] = (seen["dkim_pass"] - seen0["dkim_pass"]) / max(got, 1)
                    _verify(mode, shape_name, shape, n, sample)
                samples[mode].append(sample)
        direct = samples["direct"]
        for mode, s in samples.items():
            ratios = [x["rate"] / d["rate"] for x, d in zip(s, direct, strict=True)]
            rows.append(
                {
                    "shape": shape_name,
                    "mode": mode,
                    "messages": n,
                    "rate": statistics.median(x["rate"] for x in s),
                    "ratio": statistics.median(ratios),
                    "cpu_ms": statistics.median(x["cpu_ms"] for x in s)
                    if mode != "direct"
                    else None,
                    "peak_mb": (
                        memory_kb(gateways[mode].pids, "VmHWM") / 1024 if mode != "direct" else None
                    ),
                    "scanner_cpu_ms": statistics.median(x["scanner_cpu_ms"] for x in s)
                    if s and "scanner_cpu_ms" in s[0]
                    else None,
                    # Per measured run, from the gateway's own metrics (gateway modes only).
                    "delivered": [
                        {k: x[k] for k in ("messages", "avg_bytes", "dkim_pass")} for x in s
                    ]
                    if isinstance(gateways.get(mode), GatewayProc)
                    else None,
                }
            )
            print(_fmt_row(rows[-1]), flush=True)
    return rows


def _verify(mode: str, shape_name: str, shape: dict[str, Any], n: int, s: dict[str, float]) -> None:
    """Refuse to report a figure for something other than what the bench claims."""
    size = shape["file"].stat().st_size
    problems = []
    if s["messages"] != n:
        problems.append(f"{s['messages']:.0f} messages counted, {n} sent")
    if not size <= s["avg_bytes"] < size * 1.2:
        problems.append(f"{s['avg_bytes']:.0f} bytes per message, the file has {size}")
    if (mode.startswith("policy") or mode == "scanning") and s["dkim_pass"] != 1.0:
        problems.append(f"DKIM passed for {100 * s['dkim_pass']:.0f}% of messages")
    if problems:
        sys.exit(f"{shape_name}/{mode}: " + "; ".join(problems))


def _fmt_row(r: dict[str, Any]) -> str:
    cpu = f"{r['cpu_ms']:.3f}" if r["cpu_ms"] is not None else "-"
    mem = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
    scan = f"{r['scanner_cpu_ms']:.3f}" if r.get("scanner_cpu_ms") is not None else "-"
    return (
        f"| {r['shape']} | {r['mode']} | {r['rate']:.0f} | {r['ratio']:.2f} | {cpu} | {mem} "
        f"| {scan} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="gateway worker processes (default: the gateway's default, one per CPU)",
    )
    p.add_argument("--shapes", default="small,large,persistent")
    p.add_argument("--modes", default="floor,proxy,policy,policy-cold,scanning")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--no-idle", action="store_true")
    p.add_argument("--idle-sessions", type=int, default=10000)
    p.add_argument("--no-peak", action="store_true")
    p.add_argument("--peak-clients", type=int, default=200, help="bench/peak.py's burst")
    p.add_argument("--peak-size", type=int, default=2_000_000)
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument(
        "--pool-size",
        type=int,
        default=64,
        help="backend.pool_size: spare backend sessions kept ready per worker (0: each client "
        "session connects its own)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        help="the gateways' logging.level (default INFO, the gateway's own default; WARNING "
        "turns off the per-transaction lines)",
    )
    args = p.parse_args()
    if args.workers is None:
        from gateway.workers import available_cpus

        args.workers = available_cpus()
    args.shapes = args.shapes.split(",")

    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    files = signed_messages(tmp)
    for shape in SHAPES.values():
        shape["file"] = files[shape["size"]]
    sink_port = free_port()
    sink = start_sink(sink_port)
    gateways: dict[str, GatewayProc | FloorProc] = {}
    from bench_site import BENCH_ZONE

    from tests.support.dnsserver import DnsServer

    dns = DnsServer(BENCH_ZONE)
    results: dict[str, Any] = {
        "workers": args.workers,
        "log_level": args.log_level,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    scanners: Scanners | None = None
    try:
        time.sleep(0.2)  # smtp-sink has no readiness signal; the first source run retries anyway
        if "scanning" in args.modes.split(","):
            scanners = Scanners(tmp / "scanners", dns.address)
        for mode in args.modes.split(","):
            if mode == "floor":
                gateways[mode] = FloorProc(sink_port)
                continue
            gateways[mode] = GatewayProc(
                tmp / mode,
                sink_port,
                mode_policy(mode, tmp, scanners),
                args.workers,
                dns=dns.address,
                log_level=args.log_level,
                pool_size=args.pool_size,
            )
        print(
            "| shape | mode | msg/s | ratio to direct | gateway CPU ms/msg | peak RSS MB "
            "| scanners CPU ms/msg |"
        )
        print("|---|---|---|---|---|---|---|")
        results["throughput"] = throughput(args, sink_port, gateways, scanners)
        from checks import measure as measure_checks

        wire = files[4096].read_bytes().replace(b"\n", b"\r\n")
        results["checks"] = measure_checks(dns, wire)
        print("\n| check | stage | CPU µs per call |\n|---|---|---|")
        for row in results["checks"]:
            print(f"| {row['check']} | {row['stage']} | {row['us_per_call']:.2f} |")
        # Latency through the gateway (the first gateway mode), never the floor.
        first = next(g for g in gateways.values() if isinstance(g, GatewayProc))
        if not args.no_latency:
            from latency import measure

            results["latency"] = measure(sink_port, first.port)
            lat = results["latency"]
            print(
                f"\nlatency at {lat['rate']}/s, new connection per message (ms): "
                f"direct p50 {lat['direct']['p50']:.2f} p99 {lat['direct']['p99']:.2f}; "
                f"gateway p50 {lat['gateway']['p50']:.2f} p99 {lat['gateway']['p99']:.2f}; "
                f"added p50 {lat['added_p50']:.2f} p99 {lat['added_p99']:.2f}"
            )
        for g in gateways.values():
            g.stop()
        gateways.clear()
        if not args.no_idle:
            from idle import measure_idle

            g = GatewayProc(
                tmp / "idle", sink_port, MODES["proxy"], 1, max_connections=args.idle_sessions + 100
            )
            gateways["idle"] = g
            results["idle"] = measure_idle(g.port, g.pids[0], args.idle_sessions)
            i = results["idle"]
            print(
                f"\nidle sessions: {i['sessions']} held by one process, RSS "
                f"{i['rss_before_mb']:.0f} -> {i['rss_after_mb']:.0f} MB, "
                f"{i['kb_per_session']:.1f} KB per session"
            )
        if not args.no_peak:
            from peak import measure_peak, print_peak

            results["peak"] = measure_peak(args.peak_clients, args.peak_size, tmp)
            print_peak(results["peak"])
    finally:
        for g in gateways.values():
            g.stop()
        if scanners is not None:
            scanners.stop()
        sink.terminate()
        sink.wait(10)
        dns.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    main()
