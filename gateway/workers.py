"""N worker processes sharing each listener (SO_REUSEPORT), one master.

Why processes: one Python process is one core; the kernel spreads new
connections across the workers' sockets. The master only forks, forwards
signals (one SIGTERM drains every worker), and restarts a worker that died
unexpectedly. Metrics use prometheus-client's multiprocess mode so that any
worker's /metrics reports the sum; the directory must be set before
prometheus_client is first imported, which is why this module imports the
rest of the gateway only after choosing it.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ENV_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"


def available_cpus() -> int:
    """CPUs this process may use, honouring affinity and a cgroup CPU quota (containers)."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        try:  # cgroup v1
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if q > 0 and p > 0:
                n = min(n, max(1, math.ceil(q / p)))
        except (OSError, ValueError):
            pass
    return max(1, n)


def raise_fd_limit() -> int:
    """Idle sessions cost a descriptor each: take the hard limit, not the default soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def ensure_free(addresses: list[tuple[str, int]]) -> None:
    """Refuse to start if something already listens on one of these addresses.

    The workers bind with SO_REUSEPORT, which lets a second gateway started by
    the same user share the port silently (half the connections each, two
    policies, two sets of metrics). A plain bind (SO_REUSEADDR, as asyncio's)
    fails on a listening port, so the master tries one for each address first.
    """
    for host, port in addresses:
        if port == 0:
            continue
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(sockaddr)
                except OSError as e:
                    raise OSError(
                        e.errno,
                        f"cannot listen on {host}:{port}: {e.strerror} "
                        "(is another smtp-gateway running there?)",
                    ) from None


def prepare_multiproc(directory: str | None) -> tuple[str, bool]:
    """Choose and empty the metrics directory; returns (path, created_by_us)."""
    if "prometheus_client" in sys.modules:
        # Its value storage was fixed at import: the workers' metrics would not add up.
        raise RuntimeError("prometheus_client was imported before the multiprocess setup")
    created = directory is None
    path = directory or tempfile.mkdtemp(prefix="smtp-gateway-metrics-")
    Path(path).mkdir(parents=True, exist_ok=True)
    for f in Path(path).glob("*.db"):
        f.unlink()
    os.environ[ENV_MULTIPROC] = path
    return path, created


def supervise(count: int, run_worker: Callable[[int], int]) -> int:
    """Fork `count` workers running `run_worker(index)`; return the exit code."""
    from prometheus_client import multiprocess

    from gateway import logs, metrics

    children: dict[int, tuple[int, float]] = {}
    stopping = False

    def spawn(index: int) -> None:
        # Nothing buffered may cross the fork: each worker would write its own copy
        # of the master's pending counts.
        metrics.flush()
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = run_worker(index)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                logs.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = (index, time.monotonic())

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            sig = signal.SIGTERM
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(count):
        spawn(i)
    logs.event("workers_started", workers=count, pids=sorted(children))
    worst = 0
    fast_failures = 0
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index, started = children.pop(pid)
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, abs(code))
            continue
        metrics.WORKER_RESTARTS.inc()
        logs.failure("worker_died", severe=True, worker=index, pid=pid, exit=code)
        # A worker that dies at once (a bind error, say) must not spin the CPU.
        fast_failures = fast_failures + 1 if time.monotonic() - started < 2 else 0
        if fast_failures:
            time.sleep(min(10.0, 0.2 * 2**fast_failures))
        spawn(index)
    return worst


def cleanup(path: str, created: bool) -> None:
    if created:
        shutil.rmtree(path, ignore_errors=True)
