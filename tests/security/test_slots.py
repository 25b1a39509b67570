"""No single client can hold every slot: connections per address and per network,
greetings repeated in a loop, backend sessions per client."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from tests.support.procs import Backend, Gateway, base_config
from tests.support.smtp import RawClient


def _open(port: int, source: str) -> tuple[RawClient, tuple[int, str]]:
    c = RawClient(port, source=source)
    return c, c.reply()


def test_one_address_gets_at_most_50_sessions_by_default(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """The default preset's per-address limit (well below max_connections): the 51st
    connection from one address gets 421 4.7.0; another address still gets in."""
    gw = gateway_factory(base_config(backend.url, trusted_networks=[]))
    with ExitStack() as held:
        for _ in range(50):
            c, greeting = _open(gw.port(), "127.0.0.2")
            held.enter_context(c)
            assert greeting[0] == 220, greeting
        c, greeting = _open(gw.port(), "127.0.0.2")
        with c:
            assert (greeting[0], greeting[1][4:9]) == (421, "4.7.0"), greeting
        c, greeting = _open(gw.port(), "127.0.1.2")
        with c:
            assert greeting[0] == 220
    # Held slots come back when the sessions end.
    c, greeting = _open(gw.port(), "127.0.0.2")
    with c:
        assert greeting[0] == 220


def test_one_network_gets_at_most_150_sessions_by_default(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = gateway_factory(base_config(backend.url, trusted_networks=[]))
    with ExitStack() as held:
        for n in range(150):
            c, greeting = _open(gw.port(), f"127.0.3.{1 + n // 40}")
            held.enter_context(c)
            assert greeting[0] == 220, (n, greeting)
        c, greeting = _open(gw.port(), "127.0.3.200")  # a new address, the same /24
        with c:
            assert greeting[0] == 421, greeting


def test_a_greeting_repeated_in_a_loop_counts_as_junk(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """EHLO after EHLO holds a slot as NOOP does: past max_junk_commands (100) each
    counts as an error, and max_errors (20) of them end the session with 421."""
    gw = gateway_factory(base_config(backend.url))
    with RawClient(gw.port()) as c:
        assert c.reply()[0] == 220
        codes = []
        for _ in range(125):
            c.send(b"EHLO client.test\r\n")
            codes.append(c.reply()[0])
            if codes[-1] != 250:
                break
        # 100 free, 20 more that each count as an error, then 421 on the next.
        assert codes[:120] == [250] * 120
        assert codes[120:] == [421]
        assert c.closed()


def test_one_client_holds_at_most_20_backend_sessions(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """A backend session goes with a client session, so a client opening many
    sessions, each with a transaction, would hold every session the gateway may
    open to the backend (backend.max_sessions). Past 20 (what a Postfix sender opens
    to one destination by default), its transactions get
    451 4.4.5; another client's do not."""
    gw = gateway_factory(base_config(backend.url, backend={"max_sessions": 40}))
    with ExitStack() as held:
        replies = []
        for _ in range(21):
            c, _ = _open(gw.port(), "127.0.0.2")
            held.enter_context(c)
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<a@sender.test>")
            replies.append(c.cmd("RCPT TO:<x@example.test>"))
        assert [code for code, _ in replies[:20]] == [250] * 20
        assert replies[20][1] == "451 4.4.5 Too many sessions to the next hop from this client"
        c, _ = _open(gw.port(), "127.0.5.2")
        with c:
            c.cmd("EHLO other.test")
            c.cmd("MAIL FROM:<a@sender.test>")
            assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert gw.metric("smtp_gateway_backend_circuit_open") == 0
