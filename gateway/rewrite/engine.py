"""The rewrite stages in their order, built once per policy (re)load.

Recipient, at RCPT:   canonical -> [relay control] -> SRS reverse -> virtual alias
Sender, at MAIL:      canonical -> masquerade        (after the MAIL checks: SPF)
                      -> SRS forward, once a recipient is forwarded off our domains
Headers, at DATA:     canonical (+ masquerade for senders), after every check:
                      DMARC judged the From the client sent.

Relay control judges the recipient after canonical rewriting (a merged
domain can be mapped onto a local one); what SRS reverse and virtual aliases
produce is the administrator's own routing and may leave our domains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from gateway import metrics
from gateway.address import Address
from gateway.rewrite.header import Rewrite, rewrite_headers
from gateway.rewrite.options import Canonical, RewriteOptions
from gateway.rewrite.srs import Srs, SrsError
from gateway.rewrite.table import RuleError, Subaddress, Table, make_address, read_table_file

log = logging.getLogger("gateway.rewrite")


class AliasLoop(Exception):
    """Alias expansion went round in a circle, too deep or too wide, or produced an
    invalid address; the RCPT is refused."""


@dataclass(frozen=True, slots=True)
class Step:
    stage: str
    result: tuple[Address, ...]


def _count(stage: str) -> None:
    metrics.child(metrics.REWRITES, stage).inc()


def _load(section: str, rules: list[tuple[str, list[str]]], file: str | None, base: Path,
          sub: Subaddress) -> Table:  # fmt: skip
    if file is not None:
        rules = rules + read_table_file(base / file)
    try:
        return Table(rules, sub)
    except RuleError as e:
        raise RuleError(f"rewrite.{section}: {e}") from None


class Rewriter:
    def __init__(self, opts: RewriteOptions, base: Path) -> None:
        self.opts = opts
        # Files the tables were read from: a change to any of them reloads the policy.
        self.files = [
            base / f
            for f in (
                opts.canonical_sender.file,
                opts.canonical_recipient.file,
                opts.virtual_alias.file,
                opts.srs.secrets_file if opts.srs.enabled else None,
            )
            if f is not None
        ]
        sub = Subaddress(opts.subaddress_delimiter, opts.subaddress)

        def canonical(name: str, c: Canonical) -> Table:
            return _load(name, [(k, [v]) for k, v in c.rules.items()], c.file, base, sub)

        self.c_sender = canonical("canonical_sender", opts.canonical_sender)
        self.c_rcpt = canonical("canonical_recipient", opts.canonical_recipient)
        va = opts.virtual_alias
        alias_rules = [
            (k, [x.strip() for x in v.split(",")] if isinstance(v, str) else v)
            for k, v in va.rules.items()
        ]
        self.alias = _load("virtual_alias", alias_rules, va.file, base, sub)
        m = opts.masquerade
        self.masq_domains = [d.lower().strip(".") for d in m.domains]
        self.masq_except = {x.lower() for x in m.exceptions}
        self.masq_exclude = {d.lower().strip(".") for d in m.exclude_domains}
        self.srs: Srs | None = None
        if opts.srs.enabled:
            secrets = list(opts.srs.secrets)
            if opts.srs.secrets_file:
                path = base / opts.srs.secrets_file
                try:
                    secrets += [x.strip() for x in path.read_text().splitlines() if x.strip()]
                except OSError as e:
                    raise RuleError(f"rewrite.srs.secrets_file: {path}: {e.strerror}") from None
            if not secrets:
                raise RuleError("rewrite.srs: no secrets")
            assert opts.srs.domain is not None
            self.srs = Srs(
                opts.srs.domain,
                secrets,
                max_age_days=opts.srs.max_age_days,
                hash_length=opts.srs.hash_length,
            )

        # Built once per (re)load, not per message.
        self._header_fns = self.header_rewriters()
        # Nothing to do at all: the session skips every rewrite call (the common case).
        self.active = bool(
            self.c_sender or self.c_rcpt or self.alias or self.masq_domains or self.srs
        )

    # -- single stages ------------------------------------------------------------
    @staticmethod
    def _one(table: Table, addr: Address) -> Address | None:
        """A one-to-one rewrite; a rule whose result is not a valid address (a regex
        capture can make one) leaves the address as it was, logged."""
        try:
            hit = table.lookup(addr)
        except RuleError as e:
            log.warning("rewrite of %s skipped: %s", addr, e)
            return None
        return hit[0] if hit else None

    def masquerade(self, addr: Address) -> Address | None:
        if addr.is_null or addr.literal or addr.local.lower() in self.masq_except:
            return None
        dom = addr.domain.rstrip(".")
        for d in self.masq_domains:
            if dom.endswith("." + d):
                if any(dom == x or dom.endswith("." + x) for x in self.masq_exclude):
                    return None
                try:
                    return make_address(addr.local, d)
                except RuleError:
                    return None
        return None

    # -- envelope --------------------------------------------------------------
    def sender_steps(self, addr: Address) -> list[Step]:
        """canonical then masquerade; each step that changed something."""
        steps = []
        if self.opts.canonical_sender.envelope and self.c_sender:
            new = self._one(self.c_sender, addr)
            if new is not None and new != addr:
                addr = new
                steps.append(Step("canonical_sender", (addr,)))
        if self.opts.masquerade.envelope and self.masq_domains:
            new = self.masquerade(addr)
            if new is not None:
                addr = new
                steps.append(Step("masquerade", (addr,)))
        return steps

    def sender(self, addr: Address) -> Address:
        steps = self.sender_steps(addr)
        for s in steps:
            _count(s.stage)
        return steps[-1].result[0] if steps else addr

    def canonical_recipient(self, addr: Address) -> Address:
        if self.opts.canonical_recipient.envelope and self.c_rcpt:
            new = self._one(self.c_rcpt, addr)
            if new is not None and new != addr:
                _count("canonical_recipient")
                return new
        return addr

    def is_srs(self, addr: Address) -> bool:
        """Whether `addr` is an SRS address at our SRS domain."""
        return self.srs is not None and addr.domain == self.srs.domain and Srs.is_srs(addr.local)

    def srs_reverse(self, addr: Address, bounce: bool = True) -> Address:
        """Raises SrsError for an SRS address at our SRS domain that we did not make,
        or that is not written to by a bounce (null sender): SRS addresses exist to
        bring bounces back, and reversing anything else would let a sender that
        guessed or reused one relay through us."""
        if self.srs is None or not self.is_srs(addr):
            return addr
        if not bounce:
            raise SrsError("an SRS address takes bounces only (MAIL FROM:<>)")
        local, domain = self.srs.reverse(addr.local)
        _count("srs_reverse")
        try:
            return make_address(local, domain)
        except RuleError as e:
            raise SrsError(str(e)) from None

    def srs_forward(self, addr: Address) -> Address:
        if self.srs is None or addr.is_null:
            return addr
        local = self.srs.forward(addr.local, addr.domain)
        if local == addr.local and addr.domain == self.srs.domain:
            return addr
        try:
            new = make_address(local, self.srs.domain)
        except RuleError:
            return addr  # a sender too long to wrap: delivered unwrapped, SPF may fail
        _count("srs_forward")
        return new

    def expand(self, addr: Address) -> list[Address]:
        """Virtual alias expansion, recursive, de-duplicated, in order. Raises AliasLoop."""
        if not self.alias:
            return [addr]
        out: list[Address] = []
        va = self.opts.virtual_alias

        def walk(a: Address, chain: tuple[str, ...]) -> None:
            key = f"{a.local.lower()}@{a.domain}"
            if key in chain:
                raise AliasLoop(f"alias loop: {' -> '.join((*chain, key))}")
            if len(chain) > va.max_depth:
                raise AliasLoop(f"alias nesting deeper than {va.max_depth} at {key}")
            try:
                targets = self.alias.lookup(a)
            except RuleError as e:
                raise AliasLoop(f"alias of {key}: {e}") from None
            if targets is None:
                if a not in out:
                    out.append(a)
                return
            for t in targets:
                if f"{t.local.lower()}@{t.domain}" == key:
                    if t not in out:
                        out.append(t)  # `a: a, b` keeps a and adds b
                else:
                    walk(t, (*chain, key))
                if len(out) > va.max_expansion:
                    raise AliasLoop(f"alias expands to more than {va.max_expansion} addresses")

        try:
            walk(addr, ())
        except AliasLoop:
            metrics.REWRITE_LOOPS.inc()
            raise
        if out != [addr]:
            _count("virtual_alias")
        return out

    # -- headers ------------------------------------------------------------------
    def header_rewriters(self) -> tuple[Rewrite | None, Rewrite | None]:
        sender_fns: list[Rewrite] = []
        if self.opts.canonical_sender.headers and self.c_sender:
            sender_fns.append(lambda a: self._one(self.c_sender, a))
        if self.opts.masquerade.headers and self.masq_domains:
            sender_fns.append(self.masquerade)

        def sender(a: Address) -> Address | None:
            cur = a
            for fn in sender_fns:
                cur = fn(cur) or cur
            return cur if cur != a else None

        rcpt = None
        if self.opts.canonical_recipient.headers and self.c_rcpt:
            rcpt = lambda a: self._one(self.c_rcpt, a)  # noqa: E731
        return (sender if sender_fns else None), rcpt

    def headers(self, wire: bytes) -> bytes:
        sender, rcpt = self._header_fns
        if sender is None and rcpt is None:
            return wire
        new, n = rewrite_headers(wire, sender, rcpt)
        if n:
            metrics.child(metrics.REWRITES, "headers").inc(n)
        return new


__all__ = ["AliasLoop", "Rewriter", "RuleError", "SrsError", "Step"]
