from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.procs import Backend, Gateway
from tests.support.redisserver import RedisServer

ROOT = Path(__file__).resolve().parent.parent
# The tier of each test follows from where it lives: tests/unit is the fast tier.
_SLOW = (
    "tests/interop/",
    "tests/kubernetes/",
    "tests/observability/",
    "tests/integration/test_bench_smoke.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.relative_to(ROOT).as_posix()
        if where.startswith("tests/unit/"):
            item.add_marker(pytest.mark.unit)
            continue
        item.add_marker(pytest.mark.integration)
        if where.startswith(_SLOW):
            item.add_marker(pytest.mark.slow)


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
