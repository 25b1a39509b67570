"""The backend as the session sees it (gateway/forward/backend.py): failover and the
circuit breaker, what one client may hold, what a backend cannot take refused before
it goes out; against a scripted backend (tests/unit/forward/scripted.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway import config, replies
from gateway.forward.backend import (
    BackendUnavailable,
    Breaker,
    ClientInfo,
    PerClient,
    SmtpBackend,
    client_reply,
    fit_params,
)
from gateway.forward.client import (
    BackendBadReply,
    BackendLost,
    BackendRefusedClient,
    BackendTimeout,
    ClientCapReached,
    SmtpReply,
)
from tests.unit.forward.scripted import QUEUED, Session, scripted


def test_breaker_opens_and_half_opens() -> None:
    b = Breaker(failures=2, cooldown=0.0)
    b.failure()
    assert b.allow()
    b.failure()
    assert b.opened_at is not None
    assert b.allow()  # cooldown 0: one probe allowed at once
    b.success()
    assert b.opened_at is None and b.failures == 0
    b2 = Breaker(failures=1, cooldown=60)
    b2.failure()
    assert not b2.allow() and b2.open


def test_the_workers_share_max_sessions_rounded_up() -> None:
    from gateway import config
    from gateway.forward.backend import SmtpBackend

    def caps(max_sessions: int | None, workers: int) -> list[int | None]:
        cfg = config.Backend(url=["smtp://127.0.0.1:1", "smtp://127.0.0.1:2"])
        cfg = cfg.model_copy(update={"max_sessions": max_sessions})
        return [t.pool.max_open for t in SmtpBackend(cfg, "gw.test", workers).targets]

    assert caps(100, 1) == [100, 100]  # per target: each backend has its own limit
    assert caps(100, 3) == [34, 34]
    assert caps(1, 4) == [1, 1]  # never none at all
    assert caps(None, 2) == [None, None]


# -- against a scripted backend (tests/unit/forward/scripted.py) --------------------
INFO = ClientInfo("192.0.2.7", 4000, "client.test", True, False)


def backend(urls: int = 2, **cfg: object) -> SmtpBackend:
    c = config.Backend.model_validate(
        {
            "url": [f"smtp://127.0.0.1:{n + 1}" for n in range(urls)],
            "defer_mail": False,
            "circuit_breaker": {"failures": 1, "cooldown": 60},
            **cfg,
        }
    )
    return SmtpBackend(c, "gw.test")


def test_parameters_a_backend_does_not_offer_are_dropped_and_remembered() -> None:
    params = ["SMTPUTF8", "BODY=8BITMIME", "SIZE=100"]
    assert fit_params(params, {"SMTPUTF8": "", "8BITMIME": "", "SIZE": ""}) == (params, True, True)
    fit = fit_params(params, {"SIZE": ""})
    assert fit == (["SIZE=100"], False, False)


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (BackendUnavailable("x"), replies.BACKEND_UNAVAILABLE),
        (BackendUnavailable("x", busy=True), replies.BACKEND_BUSY),
        (BackendUnavailable("x", busy=True, client_cap=True), replies.BACKEND_CLIENT_CAP),
        (BackendUnavailable("x", refused=True), replies.BACKEND_REFUSED_CLIENT),
        (BackendTimeout("x"), replies.BACKEND_TIMEOUT),
        (BackendBadReply("x"), replies.BACKEND_BAD_REPLY),
        (BackendLost("x"), replies.BACKEND_LOST),
        (ConnectionResetError(), replies.BACKEND_LOST),
    ],
)
def test_a_failed_backend_hop_is_always_a_4xx_that_says_what_failed(
    error: Exception, reply: replies.Reply
) -> None:
    assert client_reply(error) is reply and reply.temporary


def test_one_client_holds_at_most_its_share_and_its_network_four_times_that() -> None:
    per = PerClient(2)
    per.admit("192.0.2.1")
    per.admit("192.0.2.1")
    with pytest.raises(ClientCapReached):
        per.admit("192.0.2.1")
    for host in range(2, 5):
        per.admit(f"192.0.2.{host}")
        per.admit(f"192.0.2.{host}")
    with pytest.raises(ClientCapReached, match="network"):
        per.admit("192.0.2.99")  # 8 in the /24
    per.admit("198.51.100.1")  # another network is not affected
    per.release("192.0.2.1")
    per.admit("192.0.2.1")  # its place came back, in the network too
    for _ in range(10):
        PerClient(None).admit("192.0.2.1")  # no cap configured


def test_a_lost_backend_fails_over_and_opens_its_breaker() -> None:
    b = backend()
    first = scripted(b.targets[0], lambda n: Session(n, answers={"MAIL": BackendLost("reset")}))
    second = scripted(b.targets[1], lambda n: Session(n))
    link = b.link()
    reply, txn = asyncio.run(b.begin(link, INFO, "a@sender.test", []))
    assert reply.ok and txn is not None
    assert first.made[0].closed and second.made[0].said[-1] == "MAIL FROM:<a@sender.test>"
    assert b.targets[0].breaker.open and not b.targets[1].breaker.open
    assert b.available  # the second is up
    asyncio.run(b.begin(b.link(), INFO, "b@sender.test", []))
    assert len(first.made) == 1  # the open breaker keeps the next transaction away


def test_a_backend_closing_at_mail_counts_as_a_failure() -> None:
    b = backend()
    scripted(b.targets[0], lambda n: Session(n, answers={"MAIL": SmtpReply(421, ["4.3.2 bye"])}))
    second = scripted(b.targets[1], lambda n: Session(n))
    reply, txn = asyncio.run(b.begin(b.link(), INFO, "a@sender.test", []))
    assert reply.ok and txn is not None and len(second.made) == 1
    assert b.targets[0].breaker.failures == 1


def test_a_refused_client_identity_is_not_the_backends_failure() -> None:
    """Invariant 7: one client's values never open the breaker nor go to failover."""
    b = backend()
    ext = {"PIPELINING": "", "XCLIENT": "ADDR NAME"}
    first = scripted(
        b.targets[0], lambda n: Session(n, ext, {"XCLIENT": BackendRefusedClient("550 no")})
    )
    second = scripted(b.targets[1], lambda n: Session(n, ext))
    with pytest.raises(BackendUnavailable) as ei:
        asyncio.run(b.begin(b.link(), INFO, "a@sender.test", []))
    assert client_reply(ei.value) is replies.BACKEND_REFUSED_CLIENT
    assert first.made[0].closed and second.made == []
    assert b.targets[0].breaker.failures == 0


def test_every_backend_down_is_unavailable() -> None:
    b = backend()
    for t in b.targets:
        scripted(t, lambda n: Session(n, answers={"MAIL": BackendLost("reset")}))
    with pytest.raises(BackendUnavailable) as ei:
        asyncio.run(b.begin(b.link(), INFO, "a@sender.test", []))
    assert client_reply(ei.value) is replies.BACKEND_UNAVAILABLE
    assert not b.available


def test_a_refused_sender_leaves_nothing_open_at_the_backend() -> None:
    b = backend(urls=1)
    refusal = SmtpReply(550, ["5.7.1 sender refused"])
    pool = scripted(b.targets[0], lambda n: Session(n, answers={"MAIL": refusal}))
    reply, txn = asyncio.run(b.begin(b.link(), INFO, "a@sender.test", []))
    assert reply is refusal and txn is None
    assert pool.made[0].said[-1] == "RSET"


def test_a_deferred_mail_goes_out_with_the_first_recipient() -> None:
    b = backend(urls=1, defer_mail=True)
    pool = scripted(b.targets[0], lambda n: Session(n))

    async def go() -> list[str]:
        reply, txn = await b.begin(b.link(), INFO, "a@sender.test", ["BODY=8BITMIME"])
        assert reply.code == 250 and txn is not None
        assert pool.made == []  # nothing at the backend yet
        assert (await txn.rcpt("x@example.test", [])).ok
        assert (await txn.rcpt("y@example.test", [])).ok
        return pool.made[0].said

    assert asyncio.run(go()) == [
        "MAIL FROM:<a@sender.test>",  # BODY=8BITMIME dropped: not offered
        "RCPT TO:<x@example.test>",
        "RCPT TO:<y@example.test>",
    ]


def test_utf8_a_backend_cannot_take_is_refused_before_it_goes_out() -> None:
    b = backend(urls=1)
    pool = scripted(b.targets[0], lambda n: Session(n, {"PIPELINING": ""}))

    async def go() -> tuple[SmtpReply, list[SmtpReply]]:
        _, txn = await b.begin(b.link(), INFO, "a@sender.test", ["SMTPUTF8"])
        assert txn is not None
        rcpt = await txn.rcpt("j\u00f6rg@example.test", [])
        data = await txn.data("Subject: gr\u00fc\u00df\r\n\r\nhi\r\n".encode(), 1)
        await txn.finish()
        return rcpt, data

    rcpt, [data] = asyncio.run(go())
    assert (rcpt.code, data.code) == (553, 554)
    assert data.lines == [f"{replies.UTF8_HEADERS_UNSUPPORTED.enhanced} "
                          f"{replies.UTF8_HEADERS_UNSUPPORTED.text}"]  # fmt: skip
    said = pool.made[0].said
    assert "DATA" not in said and said[-1] == "RSET"  # reset, not left half open
    assert said.count("RSET") == 1  # finish does not reset it again


def test_a_transaction_not_delivered_is_reset_before_the_next_one() -> None:
    b = backend(urls=1)
    refusal = SmtpReply(552, ["5.3.4 too big"])
    pool = scripted(b.targets[0], lambda n: Session(n, answers={"DATA": [refusal, QUEUED]}))

    async def go() -> None:
        link = b.link()
        for _ in range(2):
            _, txn = await b.begin(link, INFO, "a@sender.test", [])
            assert txn is not None
            await txn.rcpt("x@example.test", [])
            await txn.data(b"Subject: s\r\n\r\nhi\r\n", 1)
            await txn.finish()

    asyncio.run(go())
    [s] = pool.made  # one session for the client, both transactions
    assert [x for x in s.said if x in ("DATA", "RSET")] == ["DATA", "RSET", "DATA"]
