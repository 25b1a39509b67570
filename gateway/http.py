"""A tiny HTTP/1.0 endpoint: /metrics, /healthz/live, /healthz/ready, and the
loopback-only operator routes behind `smtp-gateway ratelimit show|reset` and
`smtp-gateway greylist show|allow|reset`.

Our own few lines on asyncio instead of prometheus_client's thread server:
that one cannot share its port between worker processes (no SO_REUSEPORT)
and runs in a thread; this one lives on the event loop like everything else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import metrics
from gateway.store.base import operator_key

if TYPE_CHECKING:
    from gateway.store import Store

MAX_REQUEST = 8192


class HttpEndpoint:
    def __init__(
        self,
        ready: Callable[[], tuple[bool, dict[str, object]]],
        store: Store | None = None,
    ) -> None:
        self.ready = ready
        self.store = store
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

    async def route(self, method: str, target: str, peer: str) -> tuple[int, str, bytes]:
        path, _, query = target.partition("?")
        if path in ("/ratelimit", "/ratelimit/reset"):
            return await self._ratelimit(method, path, query, peer)
        if path in ("/greylist", "/greylist/allow", "/greylist/reset"):
            return await self._greylist(method, path, query, peer)
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            metrics.flush()  # this process's figures exact; other workers' up to a second old
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz/live":
            return 200, "text/plain", b"ok\n"
        if path == "/healthz/ready":
            ok, details = self.ready()
            body = json.dumps({"ready": ok, **details}).encode() + b"\n"
            return (200 if ok else 503), "application/json", body
        return 404, "text/plain", b"not found\n"

    async def _ratelimit(
        self, method: str, path: str, query: str, peer: str
    ) -> tuple[int, str, bytes]:
        """Operators only: the metrics port may be open to a monitoring network, and a
        reset there would let anyone lift their own limit."""
        if self.store is None or not ipaddress.ip_address(peer).is_loopback:
            return 403, "text/plain", b"forbidden\n"
        if method != ("POST" if path.endswith("/reset") else "GET"):
            return 405, "text/plain", b"method not allowed\n"
        key = urllib.parse.parse_qs(query).get("key", [""])[0]
        if not key:
            return 400, "text/plain", b"key= is required\n"
        prefix, exact = operator_key(key)
        if path.endswith("/reset"):
            out: dict[str, object] = {"deleted": await self.store.reset(prefix, exact)}
        else:
            entries = await self.store.entries(prefix, exact)
            out = {"entries": [e._asdict() for e in entries]}
        out["pid"] = os.getpid()  # which worker answered (they share one table)
        return 200, "application/json", json.dumps(out).encode() + b"\n"

    async def _greylist(
        self, method: str, path: str, query: str, peer: str
    ) -> tuple[int, str, bytes]:
        """`smtp-gateway greylist show|allow|reset` (greylist_admin.py), for the
        in-memory state: loopback only, as the rate-limit routes (an allow from the
        network would let a sender whitelist itself)."""
        if self.store is None or not ipaddress.ip_address(peer).is_loopback:
            return 403, "text/plain", b"forbidden\n"
        if method != ("GET" if path == "/greylist" else "POST"):
            return 405, "text/plain", b"method not allowed\n"
        from gateway.store import greylist_for
        from gateway.store.greylist import Params

        args = urllib.parse.parse_qs(query)
        key = args.get("key", [""])[0]
        if not key or len(key) > 2048:
            return 400, "text/plain", b"key= is required\n"
        exact = args.get("exact", ["0"])[0] == "1"
        store = greylist_for(self.store)
        out: dict[str, object] = {}
        if path == "/greylist/allow":
            try:
                p = Params(
                    0, 1, float(args["ttl"][0]), int(args["after"][0]), float(args["awl_ttl"][0])
                )
            except (KeyError, ValueError):
                return 400, "text/plain", b"ttl=, after= and awl_ttl= are required\n"
            await store.allow(key, p)
        elif path == "/greylist/reset":
            out["deleted"] = await store.reset(key, exact)
        else:
            out["entries"] = [e._asdict() for e in await store.entries(key, exact)]
        out["pid"] = os.getpid()
        return 200, "application/json", json.dumps(out).encode() + b"\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                peer = writer.get_extra_info("peername")[0]
                status, ctype, body = await self.route(parts[0], parts[1], peer)
            reason = {
                200: "OK",
                400: "Bad Request",
                403: "Forbidden",
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
