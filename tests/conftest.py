from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway
from tests.support.redisserver import RedisServer


@pytest.fixture
def backend_factory(tmp_path: Path) -> Iterator[Callable[..., Backend]]:
    started: list[Backend] = []

    def make(*args: str) -> Backend:
        b = Backend(tmp_path / f"spool{len(started)}", *args)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def backend(backend_factory: Callable[..., Backend]) -> Backend:
    return backend_factory("--xclient")


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(cfg: dict[str, Any], **kw: Any) -> Gateway:
        g = Gateway(tmp_path / f"gw{len(started)}", cfg, **kw)
        started.append(g)
        return g

    yield make
    for g in started:
        g.stop()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()
