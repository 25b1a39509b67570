"""The backend side of one client session: at most one backend session, bound to
that client for the client session's life.

Why bound: a backend told who the client is (XCLIENT) keeps that identity for
the rest of the connection. Postfix then judges XCLIENT against the new
client's address and stops offering it, so the identity can be neither changed
nor undone; XFORWARD, which would still be offered, only changes what Postfix
logs, not what it checks. A session handed to a second client therefore made
Postfix judge the second client as the first (its access lists, its rate
limits, its Received header). So a backend session serves one client session,
any number of its transactions, and is closed with it (forward/pool.py keeps
sessions connected and greeted ahead of need, so binding costs little time).

Everything a client controls that travels in XCLIENT or XFORWARD is bounded as
Postfix's smtpd bounds it (255 octets per value as sent, xtext-encoded); a value
that does not fit is sent as `[UNAVAILABLE]`, so no client can make the backend
refuse the command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.forward.client import BackendLost, SmtpClient

if TYPE_CHECKING:
    from gateway.forward.backend import Target

MAX_HELO = 255  # RFC 5321 4.5.3.1.2 (a domain) and Postfix's VALID_HOSTNAME_LEN


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The real client, for XCLIENT/XFORWARD."""

    addr: str
    port: int
    helo: str | None
    esmtp: bool
    tls: bool


def address_literal(addr: str) -> str:
    return f"[IPv6:{addr}]" if ":" in addr else f"[{addr}]"


def ehlo_name(c: ClientInfo) -> str:
    """What to EHLO with on the client's behalf after XCLIENT: its own HELO name when
    that can go on a command line as it is (printable ASCII, one word, at most 255
    octets), else its address literal, which is what RFC 5321 4.1.4 has a client
    without a usable name send. Never the gateway's own name: the backend would
    judge and record the gateway's HELO as the client's."""
    helo = c.helo
    if helo and len(helo) <= MAX_HELO and helo.isascii() and helo.isprintable() and " " not in helo:
        return helo
    return address_literal(c.addr)


def client_attrs(c: ClientInfo) -> dict[str, str]:
    """XCLIENT / XFORWARD attributes (forward/client.py encodes and bounds them)."""
    addr = f"IPV6:{c.addr}" if ":" in c.addr else c.addr
    attrs = {
        "ADDR": addr,
        "PORT": str(c.port),
        "NAME": "[UNAVAILABLE]",
        "PROTO": "ESMTP" if c.esmtp else "SMTP",
    }
    if c.helo:
        attrs["HELO"] = c.helo
    return attrs


class ClientLink:
    """The one backend session of a client session, if it has one yet."""

    __slots__ = ("identified", "info", "session", "target")

    def __init__(self) -> None:
        self.session: SmtpClient | None = None
        self.target: Target | None = None
        self.info: ClientInfo | None = None
        # The backend was told who the client is (XCLIENT): no XFORWARD needed.
        self.identified = False

    async def session_for(
        self, target: Target, info: ClientInfo, fresh: bool = False
    ) -> tuple[SmtpClient, bool]:
        """This client's session at `target`, and whether it served before (a spare or
        an earlier transaction: it may have gone stale). A new one is taken from the
        target's pool and told who the client is.

        A client that greets again with another name (or after STARTTLS) gets a new
        session: the old one speaks for what it said before, and cannot be changed.
        """
        session = self.session
        if session is not None:
            if self.target is target and self.info == info and session.reusable:
                return session, True
            self.drop()
        self._admit(info)  # counted from now: concurrent sessions see it at once
        try:
            return await self._bind(target, info, fresh)
        except BaseException:
            self._released(info)
            raise

    async def _bind(self, target: Target, info: ClientInfo, fresh: bool) -> tuple[SmtpClient, bool]:
        for attempt in (0, 1):
            session, reused = await target.pool.acquire(fresh or attempt > 0)
            identified = target.cfg.xclient and "XCLIENT" in session.extensions
            try:
                if identified:
                    await session.xclient(client_attrs(info), ehlo_name(info))
            except BackendLost:
                session.close()
                if reused and attempt == 0:
                    continue  # a spare the backend had dropped since: one more try
                raise
            except BaseException:
                session.close()  # refused: never carries anyone's transaction
                raise
            self.session, self.target, self.info = session, target, info
            self.identified = identified
            return session, reused
        raise AssertionError("unreachable")

    def drop(self, target: Target | None = None) -> None:
        """Discard the session (it failed, or speaks for another identity); with
        `target`, only if it is the session at that target."""
        if target is not None and target is not self.target:
            return
        session, self.session = self.session, None
        info, self.info = self.info, None
        self.target = None
        self.identified = False
        if session is not None:
            assert info is not None
            self._released(info)
            session.quit_now()

    def _admit(self, info: ClientInfo) -> None:
        """Count a backend session for this client, or raise BackendBusy if it may not
        have another."""

    def _released(self, info: ClientInfo) -> None:
        """This client session no longer holds (or will not get) that session."""

    async def end(self) -> None:
        """The client session is over: so is its backend session (QUIT, without
        waiting for the 221: nothing depends on it, and the backend logs the QUIT)."""
        self.drop()
