"""How many idle SMTP sessions one gateway process holds, and its memory per session.

A separate client process opens N connections, reads each greeting, and holds
them; the gateway's resident memory is read before and after from /proc.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLIENT = r"""
import resource, socket, sys, selectors
n, port = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
for i in range(n):
    s = socket.socket()
    s.connect(("127.0.0.1", port))
    socks.append(s)
    if len(socks) % 500 == 0 or i == n - 1:
        for t in socks[-500:]:
            t.settimeout(30)
            assert t.recv(100).startswith(b"220"), "no greeting"
print("HELD", len(socks), flush=True)
sys.stdin.readline()
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure_idle(port: int, pid: int, sessions: int) -> dict[str, Any]:
    before = rss_kb(pid)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(sessions), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    if not line.startswith("HELD"):
        proc.kill()
        raise RuntimeError(f"idle client failed: {line!r}")
    time.sleep(0.5)  # let the gateway finish writing greetings it already queued
    after = rss_kb(pid)
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(60)
    return {
        "sessions": sessions,
        "rss_before_mb": before / 1024,
        "rss_after_mb": after / 1024,
        "kb_per_session": (after - before) / sessions,
    }


_ = (resource, socket)
