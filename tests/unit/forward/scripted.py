"""A scripted backend for the forward tests: sessions that answer from a script and
note every command, handed out by a pool that connects to nothing (forward/pool.py
itself is tested in test_pool.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from gateway.forward.backend import Target
from gateway.forward.client import BackendError, SmtpClient, SmtpReply

OK_MAIL = SmtpReply(250, ["2.1.0 Ok"])
OK_RCPT = SmtpReply(250, ["2.1.5 Ok"])
QUEUED = SmtpReply(250, ["2.0.0 Ok: queued"])

Answer = SmtpReply | BackendError


class Session:
    """One backend session: `answers` maps a command (XCLIENT, MAIL, RCPT, DATA, RSET)
    to its reply or the error it raises (a list: one per use, the last repeated)."""

    def __init__(
        self,
        n: int,
        extensions: dict[str, str] | None = None,
        answers: dict[str, Answer | list[Answer]] | None = None,
    ) -> None:
        self.n = n
        self.extensions = {"PIPELINING": ""} if extensions is None else extensions
        self.answers = answers or {}
        self.said: list[str] = []
        self.closed = False
        self.tls_active = False

    @property
    def reusable(self) -> bool:
        return not self.closed

    def _answer(self, verb: str, default: SmtpReply) -> SmtpReply:
        ans = self.answers.get(verb, default)
        if isinstance(ans, list):
            ans = ans.pop(0) if len(ans) > 1 else ans[0]
        if isinstance(ans, BackendError):
            raise ans
        return ans

    async def xclient(self, attrs: dict[str, str], helo: str) -> None:
        self.said.append(f"XCLIENT {' '.join(f'{k}={v}' for k, v in attrs.items())}")
        self._answer("XCLIENT", SmtpReply(220, ["ready"]))
        self.said.append(f"EHLO {helo}")

    async def mail(
        self,
        sender: str,
        params: list[str],
        xforward: dict[str, str] | None = None,
        rcpt: tuple[str, list[str]] | None = None,
    ) -> tuple[SmtpReply, SmtpReply | None]:
        if xforward:
            self.said.append(f"XFORWARD {' '.join(f'{k}={v}' for k, v in xforward.items())}")
        self.said.append(" ".join([f"MAIL FROM:<{sender}>", *params]))
        reply = self._answer("MAIL", OK_MAIL)
        if rcpt is None or reply.code == 421:
            return reply, None
        rcpt_reply = await self.rcpt(*rcpt)
        return reply, (rcpt_reply if reply.ok else None)

    async def rcpt(self, rcpt: str, params: list[str]) -> SmtpReply:
        self.said.append(" ".join([f"RCPT TO:<{rcpt}>", *params]))
        return self._answer("RCPT", OK_RCPT)

    async def data(self, wire: bytes, recipients: int = 1, prefix: bytes = b"") -> list[SmtpReply]:
        self.said.append("DATA")
        return [self._answer("DATA", QUEUED)] * recipients

    async def rset(self) -> bool:
        self.said.append("RSET")
        return self._answer("RSET", SmtpReply(250, ["2.0.0 Ok"])).ok

    def close(self) -> None:
        self.closed = True

    def quit_now(self) -> None:
        self.said.append("QUIT")
        self.close()


class Pool:
    """Hands out `spares` first (served before: `reused`), then new sessions made by
    `make(n)`; notes whether each acquire asked for a fresh one."""

    def __init__(self, make: Callable[[int], Session], spares: list[Session] | None = None) -> None:
        self.make = make
        self.spares = spares or []
        self.made: list[Session] = []
        self.asked: list[bool] = []  # fresh?

    async def acquire(self, fresh: bool = False) -> tuple[SmtpClient, bool]:
        self.asked.append(fresh)
        if self.spares and not fresh:
            return cast(SmtpClient, self.spares.pop(0)), True
        s = self.make(len(self.made))
        self.made.append(s)
        return cast(SmtpClient, s), False

    async def close_all(self) -> None:
        pass


def scripted(target: Target, make: Callable[[int], Session], **kw: Any) -> Pool:
    """Give `target` a scripted pool in place of its real one."""
    pool = Pool(make, **kw)
    target.pool = pool  # type: ignore[assignment]
    return pool
