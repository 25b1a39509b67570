"""The HTTP endpoint's routes, without a socket: health, readiness, metrics, and
the operators' rate-limit routes for loopback only."""

from __future__ import annotations

import asyncio
import json

from gateway.http import HttpEndpoint
from gateway.store.memory import MemoryStore
from tests.unit.store.stores import Make


def route(ep: HttpEndpoint, method: str, target: str, peer: str = "127.0.0.1") -> tuple[int, bytes]:
    status, _ctype, body = asyncio.run(ep.route(method, target, peer))
    return status, body


def test_health_and_readiness() -> None:
    state = {"ready": True}
    ep = HttpEndpoint(lambda: (state["ready"], {"draining": not state["ready"]}))
    assert route(ep, "GET", "/healthz/live") == (200, b"ok\n")
    status, body = route(ep, "GET", "/healthz/ready")
    assert status == 200 and json.loads(body) == {"ready": True, "draining": False}
    state["ready"] = False
    status, body = route(ep, "GET", "/healthz/ready")
    assert status == 503 and json.loads(body)["draining"] is True
    assert route(ep, "POST", "/healthz/live")[0] == 405
    assert route(ep, "GET", "/nothing")[0] == 404


def test_metrics_are_served() -> None:
    status, body = route(HttpEndpoint(lambda: (True, {})), "GET", "/metrics")
    assert status == 200 and b"smtp_gateway_build_info" in body


def test_rate_limit_routes_are_for_loopback_operators_only() -> None:
    ep = HttpEndpoint(lambda: (True, {}), MemoryStore())
    assert route(ep, "GET", "/ratelimit?key=msgs", peer="192.0.2.1")[0] == 403
    assert route(ep, "POST", "/ratelimit/reset?key=msgs", peer="192.0.2.1")[0] == 403
    assert route(ep, "GET", "/ratelimit")[0] == 400
    assert route(ep, "POST", "/ratelimit?key=msgs")[0] == 405
    status, body = route(ep, "GET", "/ratelimit?key=msgs")
    assert status == 200 and json.loads(body)["entries"] == []
    status, body = route(ep, "POST", "/ratelimit/reset?key=msgs:192.0.2.7")
    assert status == 200 and json.loads(body)["deleted"] == 0


def test_operator_routes_answer_loopback_only(make: Make) -> None:
    from gateway.http import HttpEndpoint

    store = make()
    assert store.acquire("conc:conns:192.0.2.1", 3)
    http = HttpEndpoint(lambda: (True, {}), store)
    status, _, body = asyncio.run(http.route("GET", "/ratelimit?key=conns", "192.0.2.9"))
    assert status == 403
    status, _, body = asyncio.run(http.route("POST", "/ratelimit/reset?key=conns", "10.0.0.1"))
    assert status == 403 and asyncio.run(store.entries("conns:", exact=False))
    status, _, body = asyncio.run(http.route("GET", "/ratelimit?key=conns", "127.0.0.1"))
    assert status == 200 and b'"key": "conns:192.0.2.1"' in body
    assert asyncio.run(http.route("GET", "/ratelimit/reset?key=conns", "::1"))[0] == 405
    assert asyncio.run(http.route("POST", "/ratelimit/reset?key=conns", "::1"))[0] == 200
    assert asyncio.run(store.entries("conns:", exact=False)) == []
