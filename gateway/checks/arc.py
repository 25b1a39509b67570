"""ARC (RFC 8617) chain validation with dkimpy.

dkimpy has no async ARC API, so validation runs in a worker thread whose DNS
function asks our resolver (cache first). The chain status is recorded in
Authentication-Results; the sealer of a passing chain is remembered so that
DMARC may honour a configured list of trusted sealers (mailing lists,
forwarders) when their chain vouches for a message DMARC would refuse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, ClassVar

import dkim

from gateway.checks.base import OffLoopCheck
from gateway.dns import DnsStatus, Resolver
from gateway.headers import header_section
from gateway.pipeline.results import AuthResult
from gateway.pipeline.stage import Context, Stage

# temperror: a seal's key could not be fetched now, so the chain's status is unknown
# (with trusted sealers, DMARC then does not act on a failure: see checks/dmarc.py).
RESULTS = ("pass", "fail", "none", "temperror")


class ArcCheck(OffLoopCheck):
    name: ClassVar[str] = "arc"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    symbols: ClassVar[frozenset[str]] = frozenset(f"arc.{r}" for r in RESULTS)
    reputation: ClassVar[bool] = True

    def __init__(self, resolver: Resolver, *, threads: int = 2) -> None:
        super().__init__(resolver, threads=threads, name="arc")

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        """Synchronous for the common unsealed message: no task, no timer, no thread."""
        message = ctx.message or b""
        if not _sealed(message):
            return self._record(ctx, ("none", None, ""))
        return self._run_async(ctx, message)

    async def _run_async(self, ctx: Context, message: bytes) -> tuple[str, ...]:
        return self._record(ctx, await self.verify(message))

    @staticmethod
    def _record(ctx: Context, verdict: tuple[str, str | None, str]) -> tuple[str, ...]:
        result, sealer, why = verdict
        ctx.arc_result, ctx.arc_sealer = result, sealer
        props = {"header.oldest-pass": "0"} if result == "pass" else {}
        ctx.auth.append(AuthResult("arc", result, props, why))
        return (f"arc.{result}",)

    async def verify(self, message: bytes) -> tuple[str, str | None, str]:
        """(chain status, domain of the newest seal, reason); the tested entry point."""
        if not _sealed(message):
            return "none", None, ""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._verify, message, loop)

    def _verify(
        self, message: bytes, loop: asyncio.AbstractEventLoop
    ) -> tuple[str, str | None, str]:
        unreachable: list[str] = []  # keys that could not be fetched now

        def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
            text = (name.decode() if isinstance(name, bytes) else name).rstrip(".")
            ans = self.resolver.query_from_thread(text, "TXT", loop, timeout)
            if ans.temporary:
                unreachable.append(f"key lookup for {text}: {ans.status.value}")
            if ans.status is not DnsStatus.OK or not ans.records:
                return None
            return b"".join(ans.records[0])

        try:
            cv, results, why = dkim.arc_verify(message, dnsfunc=dnsfunc)
        except Exception as e:  # dkimpy on input it did not expect
            return "fail", None, f"ARC validation error: {e}"
        status = cv.decode() if isinstance(cv, bytes) else str(cv)
        sealer = None
        if results:
            newest: dict[str, Any] = max(results, key=lambda r: int(r.get("instance", 0)))
            d = newest.get("as-domain")
            sealer = (d.decode() if isinstance(d, bytes) else str(d or "")).lower() or None
        if status != "pass" and unreachable:
            # dkimpy reads a key it could not fetch as a broken chain; it is unknown.
            return "temperror", sealer, unreachable[0]
        return status if status in RESULTS else "fail", sealer, str(why or "")[:200]


def _sealed(message: bytes) -> bool:
    """Any ARC field at all: a set without its seal (RFC 8617 5.2) is a broken chain,
    which dkimpy reports as fail; only a message with none is `none`."""
    head = header_section(message).lower()
    return head.startswith(b"arc-") or b"\narc-" in head
