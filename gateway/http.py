"""A tiny HTTP/1.0 endpoint: /metrics, /healthz/live, /healthz/ready.

Our own few lines on asyncio instead of prometheus_client's thread server:
that one cannot share its port between worker processes (no SO_REUSEPORT)
and runs in a thread; this one lives on the event loop like everything else.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MAX_REQUEST = 8192


class HttpEndpoint:
    def __init__(
        self,
        ready: Callable[[], tuple[bool, dict[str, object]]],
    ) -> None:
        self.ready = ready
        self.registry = REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Workers: any of them answers with the sum over all of them.
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        self.server = await asyncio.start_server(
            self._handle, host, port, reuse_port=reuse_port or None, limit=MAX_REQUEST
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz/live":
            return 200, "text/plain", b"ok\n"
        if path == "/healthz/ready":
            ok, details = self.ready()
            body = json.dumps({"ready": ok, **details}).encode() + b"\n"
            return (200 if ok else 503), "application/json", body
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                status, ctype, body = self.route(parts[0], parts[1])
            reason = {
                200: "OK",
                400: "Bad Request",
                404: "Not Found",
                405: "Method Not Allowed",
                503: "Service Unavailable",
            }[status]
            writer.write(
                f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if parts[0] != "HEAD" else b"")
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
