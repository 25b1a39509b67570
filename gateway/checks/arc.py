"""ARC (RFC 8617) chain validation: `arcverify` to dkimpy's verdicts, keys by our resolver.

The chain status is recorded in Authentication-Results; the sealer of a passing
chain is remembered so that DMARC may honour a configured list of trusted
sealers (mailing lists, forwarders) when their chain vouches for a message DMARC
would refuse. As for DKIM, a chain whose keys are cached and whose message is
small is validated on the event loop, synchronously; a key not in the cache is
fetched without blocking; a large message's body hash is made in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import ClassVar, Self

import dkim

from gateway.checks import arcverify, dkimrsa
from gateway.checks.base import OffLoopCheck
from gateway.checks.dkim import OFFLOOP_BYTES, key_record, on_loop
from gateway.config import Strict
from gateway.context import Context
from gateway.dns import DnsAnswer, Resolver
from gateway.facts import ArcFacts
from gateway.vocab import AuthResult, Stage
from gateway.wire import header_section

# temperror: a seal's key could not be fetched now, so the chain's status is unknown
# (with trusted sealers, DMARC then does not act on a failure: see checks/dmarc.py).
RESULTS = ("pass", "fail", "none", "temperror")
# Longer chains are validated in the thread: the seals' header hashing grows with the
# square of the length (a chain rarely has more than three sets: a list, a forwarder).
LOOP_SETS = 8


class ArcOptions(Strict):
    enabled: bool = True


class ArcCheck(OffLoopCheck):
    name: ClassVar[str] = "arc"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    symbols: ClassVar[frozenset[str]] = frozenset(f"arc.{r}" for r in RESULTS)
    reputation: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset()
    budget: float | None = None

    def __init__(self, resolver: Resolver, *, threads: int = 2) -> None:
        super().__init__(resolver, threads=threads, name="arc")
        self.keys = dkimrsa.KeyCache()

    def configured(self, options: ArcOptions) -> Self:
        """No options beyond the switch: the same object."""
        return self

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        """Synchronous for the unsealed message, and for a sealed one whose keys are
        cached and whose body is small: no task, no timer, no thread."""
        message = ctx.message or b""
        if not _sealed(message):
            return self._record(ctx, ("none", None, ""))
        # The session's DATA reader makes every line end CRLF (check_wire).
        verdict = self._start(message, crlf_clean=True)
        if isinstance(verdict, tuple):
            return self._record(ctx, verdict)
        return self._finish(ctx, verdict)

    async def _finish(self, ctx: Context, pending: Awaitable[arcverify.Verdict]) -> tuple[str, ...]:
        return self._record(ctx, await pending)

    @staticmethod
    def _record(ctx: Context, verdict: arcverify.Verdict) -> tuple[str, ...]:
        result, sealer, why = verdict
        ctx.facts.arc = ArcFacts(result, sealer)
        # No header.oldest-pass: 0 would claim that every older message signature
        # still validates, and only the newest is verified (RFC 8617 5.2 makes the
        # rest optional). smtp.remote-ip (RFC 8617 6): the address the chain came
        # from, for whoever seals next (a list behind us copies our results).
        props = {} if result == "none" else {"smtp.remote-ip": ctx.client_ip}
        ctx.auth.append(AuthResult("arc", result, props, why))
        return (f"arc.{result}",)

    async def verify(self, message: bytes, *, crlf_clean: bool = False) -> arcverify.Verdict:
        """(chain status, domain of the newest seal, reason); the tested entry point."""
        if not _sealed(message):
            return "none", None, ""
        verdict = self._start(message, crlf_clean=crlf_clean)
        return verdict if isinstance(verdict, tuple) else await verdict

    def _start(
        self, message: bytes, *, crlf_clean: bool
    ) -> arcverify.Verdict | Awaitable[arcverify.Verdict]:
        """The verdict when the structure decides it or everything is at hand; else
        what to await for it (keys to fetch, or a large body to hash)."""
        # A large message: only its header section is parsed on the loop; the thread
        # that hashes its body parses the whole of it (as DKIM does).
        whole = message if len(message) > OFFLOOP_BYTES else None
        try:
            chain = arcverify.parse_chain(
                message if whole is None else header_section(message), crlf_clean=crlf_clean
            )
        except Exception as e:  # dkimpy's helpers on input they did not expect
            return _broken(e)
        if isinstance(chain, tuple):
            return chain
        answers: dict[str, DnsAnswer] = {}
        missing = []
        for name in chain.key_names():
            ans = self.resolver.cached(name, "TXT")
            if ans is None:
                missing.append(name)
            else:
                answers[name] = ans
        if whole is None and not missing and self._on_loop(chain, answers):
            return self._validate(chain, answers)
        return self._complete(chain, answers, missing, whole, crlf_clean)

    def _on_loop(self, chain: arcverify.Chain, answers: dict[str, DnsAnswer]) -> bool:
        """Validate on the loop? As for DKIM: the newest message signature's body
        hash and every RSA verification (a chain may have 50 seals, keys 8192 bits).
        And not a long chain: each seal hashes every set before it."""
        if len(chain.sets) > LOOP_SETS:
            return False
        records = {name: key_record(ans) for name, ans in answers.items()}
        bits = [self.keys.bits(n, r) for n in chain.verifies() if (r := records[n]) is not None]
        newest = chain.sets[0].ams.get(b"c", b"")
        # Each seal canonicalises the ARC fields of its set and of every set before it,
        # the newest message signature the fields it names: long fields (27 KB of
        # results in each of 8 sets) cost 150 ms on the loop.
        head = sum(len(n) + len(v) for n, v in chain.d.headers)
        return on_loop(len(chain.d.body), [newest], bits, head)

    async def _complete(
        self,
        chain: arcverify.Chain,
        answers: dict[str, DnsAnswer],
        missing: list[str],
        whole: bytes | None,
        crlf_clean: bool,
    ) -> arcverify.Verdict:
        # At once: a chain's sealers (a list, a forwarder) publish their keys apart.
        fetched = await asyncio.gather(*(self.resolver.query(n, "TXT") for n in missing))
        answers.update(zip(missing, fetched, strict=True))
        if whole is None and self._on_loop(chain, answers):
            return self._validate(chain, answers)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.pool, self._validate_whole, chain, answers, whole, crlf_clean
        )

    def _validate_whole(
        self,
        chain: arcverify.Chain,
        answers: dict[str, DnsAnswer],
        whole: bytes | None,
        crlf_clean: bool,
    ) -> arcverify.Verdict:
        """In the thread: the large message parsed whole (its body) first."""
        if whole is not None:
            try:
                chain.d = dkimrsa.parse(whole, crlf_clean=crlf_clean)
            except Exception as e:  # as in _start
                return _broken(e)
        return self._validate(chain, answers)

    def _validate(self, chain: arcverify.Chain, answers: dict[str, DnsAnswer]) -> arcverify.Verdict:
        def key(name: str) -> dkimrsa.PublicKey:
            record = key_record(answers[name])
            if record is None:
                raise dkim.KeyFormatError(f"missing public key: {name}")
            return self.keys.get(name, record)

        try:
            status, sealer, why = arcverify.validate(chain, key)
        except Exception as e:  # as in _start: the chain is broken, not the check
            return _broken(e)
        if status != "pass":
            # dkimpy reads a key it could not fetch as a broken chain; it is unknown.
            for name, ans in answers.items():
                if ans.temporary:
                    return "temperror", sealer, f"key lookup for {name}: {ans.status.value}"
        return status, sealer, why


def _broken(e: Exception) -> arcverify.Verdict:
    """A chain that made a helper raise: a broken chain (fail), as the dkimpy-based
    check said, never a crashed check (which the policy would turn into a tempfail
    for good, so that a sender could never get such a message through)."""
    return "fail", None, f"ARC validation error: {e}"[:200]


def _sealed(message: bytes) -> bool:
    """Any ARC field at all: a set without its seal (RFC 8617 5.2) is a broken chain,
    which dkimpy reports as fail; only a message with none is `none`."""
    head = header_section(message).lower()
    return head.startswith(b"arc-") or b"\narc-" in head
