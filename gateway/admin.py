"""What the operators' commands (`smtp-gateway ratelimit`, `smtp-gateway greylist`)
share: the settings and policy they read, and the way to the running gateway when
the state they name is in its memory.

Why through the gateway: in memory, the counts and entries live inside its
processes, so the command asks the gateway's own HTTP endpoint (the metrics
listener; http.py answers these routes to loopback peers only), and any worker
answers for all of them (they share one table, store/shared.py). With Redis the
commands talk to Redis themselves and none of this is used.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from gateway import config
from gateway.pipeline import policy as policy_mod


def load(config_path: str | None) -> tuple[config.Settings, policy_mod.Policy]:
    """The settings, and the policy they name with every check's symbols known (a
    policy naming an unknown symbol is refused before anything is asked)."""
    from gateway.checks.registry import all_known_symbols

    settings = config.load(config_path)
    return settings, policy_mod.load(settings.policy, all_known_symbols())


def loopback(settings: config.Settings, what: str) -> tuple[str, int]:
    """Where the running gateway answers: its metrics listener, a wildcard address
    asked on loopback. OSError when the listener is off: `what` cannot be reached."""
    if settings.metrics.listen is None:
        raise OSError(f"metrics.listen is off: {what} cannot be reached")
    host, port = config.split_hostport(settings.metrics.listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return host, port


async def request(host: str, port: int, method: str, path: str, query: dict[str, Any]) -> Any:
    """One request to the gateway's endpoint, its JSON answer; OSError naming the
    status line when the answer is not 200."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"{method} {path}?{urlencode(query)} HTTP/1.0\r\n"
            f"Host: {host}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if head.split(b" ", 2)[1:2] != [b"200"]:
        line = head.splitlines()[0].decode() if head else "nothing"
        raise OSError(f"gateway at {host}:{port} answered {line}")
    return json.loads(body)
