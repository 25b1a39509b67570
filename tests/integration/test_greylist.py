"""Greylisting through real SMTP sessions with the gateway's in-memory state: one
process, and workers sharing their table; the operators' commands against the
running gateway.

No test here waits for time to pass: a zero `delay` makes any retry a retry in
time, and a long one keeps every retry early. That the delay, expire and ttl
are kept on time is the store's, on a controlled clock
(tests/unit/store/test_greylist_store.py), and Redis's, on Redis's own clock
(test_greylist_redis.py).
"""

from __future__ import annotations

import smtplib
import socket
import time
import urllib.request
from collections.abc import Callable

import pytest

from tests.support.procs import Backend, Gateway, base_config

MSG = b"From: a@sender.test\r\nSubject: g\r\n\r\nhi\r\n"
OFF = "".join(f"  {c}: {{enabled: false}}\n" for c in ("spf", "dkim", "arc", "dmarc"))


def policy(greylist: str, extra: str = "") -> str:
    return f"extends: default\n{extra}checks:\n{OFF}  greylist: {{enabled: true, {greylist}}}\n"


def start(
    backend: Backend, gateway_factory: Callable[..., Gateway], greylist: str, **cfg: object
) -> Gateway:
    config = base_config(backend.url, trusted_networks=[], **cfg)
    return gateway_factory(config, policy=policy(greylist))


def attempt(
    port: int, sender: str = "a@sender.test", rcpts: tuple[str, ...] = ("x@example.test",)
) -> list[tuple[int, bytes]]:
    """One delivery attempt: each RCPT's reply, then DATA's if any was accepted."""
    out = []
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.test")
        assert s.mail(sender)[0] == 250
        for r in rcpts:
            out.append(s.rcpt(r))
        if any(code == 250 for code, _ in out):
            out.append(s.data(MSG))
    return out


def greylist_cli(gw: Gateway, *args: str) -> str:
    return gw.command("greylist", *args)


def scrape(gw: Gateway) -> str:
    with urllib.request.urlopen(gw.metrics_url + "/metrics", timeout=5) as r:
        return str(r.read().decode())


def triplets(text: str, result: str) -> float:
    prefix = f'smtp_gateway_greylist_triplets_total{{result="{result}"}}'
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(prefix))


def wait_triplets(gw: Gateway, want: dict[str, float], timeout: float = 10) -> dict[str, float]:
    """The counts, once they are `want` (each worker writes its counts within a second
    of a change, metrics.FLUSH_INTERVAL) or the timeout passed."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(gw)
        got = {r: triplets(text, r) for r in want}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_first_attempt_is_deferred_with_a_hint_the_retry_is_delivered(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = start(backend, gateway_factory, "delay: 0")
    assert attempt(gw.port()) == [(451, b"4.7.1 Greylisted, please try again in 1 second")]
    assert backend.messages() == []
    gw.wait_log(
        lambda e: e.get("event") == "rcpt_refused" and e.get("reason") == "greylist.deferred"
    )
    [(rcpt_code, _), (data_code, _)] = attempt(gw.port())
    assert (rcpt_code, data_code) == (250, 250)
    [m] = backend.messages()
    assert m["rcpt_tos"] == ["x@example.test"]
    # Whitelisted: the next message passes at once, and another sender does not.
    assert attempt(gw.port())[0][0] == 250
    assert attempt(gw.port(), sender="b@sender.test")[0][0] == 451
    counts = wait_triplets(gw, {"new": 2, "passed": 1, "whitelisted": 1})
    assert counts == {"new": 2, "passed": 1, "whitelisted": 1}
    # What the check emitted is in the check results too, by symbol.
    text = scrape(gw)
    deferred = 'smtp_gateway_check_results_total{check="greylist",symbol="greylist.deferred"}'
    assert deferred in text


def test_operators_show_allow_and_reset_the_running_gateways_entries(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    gw = start(backend, gateway_factory, "delay: 3600, auto_whitelist: {after: 0}")
    assert attempt(gw.port())[0][0] == 451
    shown = greylist_cli(gw, "show", "127.0.0.1")
    assert shown.startswith(
        "t:127.0.0.0/24|a@sender.test|x@example.test: pending, first attempt "
    ), shown
    assert "a retry passes in 60 min" in shown
    # Typed as the log shows the addresses; normalised as the check does.
    assert "pending" in greylist_cli(gw, "show", "127.0.0.9", "A+tag@Sender.TEST", "x@example.test")
    assert attempt(gw.port())[0][0] == 451  # early: still an hour to wait
    allowed = greylist_cli(gw, "allow", "127.0.0.1", "a@sender.test", "x@example.test")
    assert "t:127.0.0.0/24|a@sender.test|x@example.test: allowed" in allowed
    assert attempt(gw.port())[0][0] == 250
    assert "whitelisted, passed" in greylist_cli(gw, "show", "127.0.0.1")
    assert "reset (1 entry removed)" in greylist_cli(gw, "reset", "127.0.0.1")
    assert "nothing known" in greylist_cli(gw, "show", "127.0.0.1")
    assert attempt(gw.port())[0][0] == 451  # a first attempt again


def test_workers_share_the_greylist(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """With two workers, the kernel hands each connection to either: a retry that
    lands on the other worker must find the first attempt (`early`), not start over
    (`new`), or a client is deferred once per worker. Attempts go on until both
    workers have deferred one; across them all, exactly one was new."""
    gw = start(backend, gateway_factory, "delay: 3600, auto_whitelist: {after: 0}", workers=2)
    gw.wait_log(
        lambda e: len({x["pid"] for x in gw.events() if x.get("event") == "ready"}) >= 2,
        timeout=20,
    )
    n = 0
    deciding: set[int] = set()
    while len(deciding) < 2:
        assert n < 200, "the kernel gave every connection to one worker"
        assert attempt(gw.port())[0][0] == 451
        n += 1
        deciding = {
            e["pid"]
            for e in gw.events()
            if e.get("event") == "rcpt_refused" and e.get("reason") == "greylist.deferred"
        }
    assert wait_triplets(gw, {"new": 1, "early": n - 1}) == {"new": 1, "early": n - 1}
    # Allowed through one worker's endpoint, it passes at every worker.
    greylist_cli(gw, "allow", "127.0.0.1", "a@sender.test", "x@example.test")
    sent = 0
    delivered: set[int] = set()
    while len(delivered) < 2:
        assert sent < 200, "the kernel gave every connection to one worker"
        assert attempt(gw.port())[0][0] == 250
        sent += 1
        delivered = {
            e["pid"]
            for e in gw.events()
            if e.get("event") == "transaction" and e.get("outcome") == "delivered"
        }
    assert delivered == deciding  # both workers passed it
    assert len(backend.messages()) == sent


def _letters(i: int) -> str:
    """A sender local part per i without digits (the sender key makes runs of digits
    one `#`: spam1@ and spam2@ would be one sender)."""
    s = ""
    while True:
        s = chr(97 + i % 26) + s
        i //= 26
        if not i:
            return s


def flood(port: int, source: str, count: int, per_connection: int = 100) -> dict[bytes, int]:
    """The review's flood: new triplets pipelined (MAIL, RCPT, RSET), never retried,
    from the loopback address `source`; the reply codes, counted."""
    codes: dict[bytes, int] = {}
    for start in range(0, count, per_connection):
        n = min(per_connection, count - start)
        with socket.create_connection(("127.0.0.1", port), source_address=(source, 0)) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO flood.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(
                b"".join(
                    b"MAIL FROM:<%s@flood.test>\r\nRCPT TO:<x@example.test>\r\nRSET\r\n"
                    % _letters(start + k).encode()
                    for k in range(n)
                )
                + b"QUIT\r\n"
            )
            for _ in range(3 * n + 1):
                code = f.readline()[:3]
                codes[code] = codes.get(code, 0) + 1
    return codes


@pytest.mark.parametrize("workers", [1, 2])
def test_a_flood_of_new_triplets_from_one_network_keeps_no_other_sender_greylisted(
    backend: Backend, gateway_factory: Callable[..., Gateway], workers: int
) -> None:
    """The review's attack, small: a legitimate first attempt, then another network
    (127.0.0.2, a network of its own with network_prefix_v4: 32) pipelines ten times
    its cap of new, never retried triplets. The flood keeps its newest 50, having
    displaced its own oldest (delay 0: each had waited it); the legitimate retry
    passes, in one process and with workers sharing their table. (That a full
    store once gave the legitimate entry up to such a flood is the stores' unit
    tests', tests/unit/store/test_greylist.py, on a store small enough to fill.)"""
    opts = (
        "delay: 0, max_pending_per_network: 50, network_prefix_v4: 32, auto_whitelist: {after: 0}"
    )
    gw = start(backend, gateway_factory, opts, workers=workers)
    if workers > 1:
        gw.wait_log(
            lambda e: len({x["pid"] for x in gw.events() if x.get("event") == "ready"}) >= 2,
            timeout=20,
        )
    assert attempt(gw.port(), sender="alice@partner.test")[0][0] == 451
    codes = flood(gw.port(), "127.0.0.2", 500)
    assert codes == {b"250": 1000, b"451": 500, b"221": 5}, codes
    [(rcpt, _), (data, _)] = attempt(gw.port(), sender="alice@partner.test")
    assert (rcpt, data) == (250, 250)
    shown = greylist_cli(gw, "show", "127.0.0.2").splitlines()
    pending = sorted(line.split("|")[1] for line in shown if ": pending," in line)
    assert pending == sorted(f"{_letters(i)}@flood.test" for i in range(450, 500)), shown
    assert wait_triplets(gw, {"new": 501, "passed": 1}) == {"new": 501, "passed": 1}
