"""What the operators' commands share (gateway/admin.py): the policy read with every
check's symbols, the gateway's endpoint asked on loopback, and one request to it
(against a server in this test that notes what it was asked)."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config
from gateway.admin import load, loopback, request


def settings(listen: str | None) -> config.Settings:
    return config.Settings.model_validate({"metrics": {"listen": listen}})


def test_the_policy_is_read_knowing_every_checks_symbols(tmp_path: Path) -> None:
    """A check's own symbol (the greylist's) is known; a misspelt one is refused."""
    pol = tmp_path / "p.yaml"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"policy": str(pol)}))
    pol.write_text("actions:\n  greylist.deferred: tempfail\n")
    got, policy = load(str(cfg))
    assert got.policy == str(pol)
    assert policy.actions["greylist.deferred"] == "tempfail"
    pol.write_text("actions:\n  greylist.defered: tempfail\n")
    with pytest.raises(config.ConfigError, match=r"actions\.greylist\.defered: unknown symbol"):
        load(str(cfg))


@pytest.mark.parametrize(
    ("listen", "where"),
    [
        ("0.0.0.0:9125", ("127.0.0.1", 9125)),
        ("[::]:9125", ("::1", 9125)),
        ("127.0.0.2:9000", ("127.0.0.2", 9000)),
        ("[::1]:9000", ("::1", 9000)),
    ],
)
def test_the_gateway_is_asked_on_loopback(listen: str, where: tuple[str, int]) -> None:
    assert loopback(settings(listen), "x") == where


def test_without_the_listener_the_command_says_what_it_cannot_reach() -> None:
    with pytest.raises(OSError, match=r"metrics\.listen is off: the counts cannot be reached"):
        loopback(settings(None), "the counts")


async def served(answer: bytes, asked: list[bytes], body: Callable[[int], Awaitable[Any]]) -> Any:
    """body(port) against a server on loopback that answers `answer` to each request
    and notes the request's head in `asked`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        return await body(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def test_a_request_sends_its_query_encoded_and_returns_the_json_answer() -> None:
    asked: list[bytes] = []
    ok = b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"deleted": 2}\n'
    key = "t:spf:a b.test|x&y=z@sender.test|"
    got = asyncio.run(
        served(ok, asked, lambda port: request("127.0.0.1", port, "POST", "/reset", {"key": key}))
    )
    assert got == {"deleted": 2}
    [head] = asked
    line = head.split(b"\r\n")[0].decode()
    method, target, version = line.split(" ")
    path, _, query = target.partition("?")
    assert (method, path, version) == ("POST", "/reset", "HTTP/1.0")
    assert urllib.parse.parse_qs(query) == {"key": [key]}


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"HTTP/1.0 403 Forbidden\r\n\r\nforbidden\n", "answered HTTP/1.0 403 Forbidden"),
        (b"", "answered nothing"),
    ],
)
def test_an_answer_other_than_200_is_an_error_naming_it(answer: bytes, said: str) -> None:
    async def body(port: int) -> None:
        with pytest.raises(OSError, match=rf"gateway at 127\.0\.0\.1:{port} {said}"):
            await request("127.0.0.1", port, "GET", "/ratelimit", {"key": "k"})

    asyncio.run(served(answer, [], body))
