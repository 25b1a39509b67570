"""DMARC: our own evaluator (RFC 7489, and DMARCbis's np / t / psd / tree walk).

The existing Python DMARC libraries are dated or wrong (see the project's
library notes), and the logic is small: find the policy record, decide the
organizational domain (Public Suffix List, offline, or the DMARCbis DNS tree
walk), check SPF and DKIM alignment, then apply p / sp / np, pct and t=y.
A DNS failure during discovery is a temperror, never "no policy".
"""

from __future__ import annotations

import copy
import functools
import random
import re
from collections.abc import Awaitable, Generator
from dataclasses import dataclass
from email import policy as email_policy
from email.parser import HeaderParser
from email.utils import getaddresses
from typing import ClassVar, Literal, Self, TypeVar

from publicsuffixlist import PublicSuffixList
from pydantic import Field

from gateway.addrlist import ATEXT, too_complex
from gateway.config import Strict
from gateway.context import Context
from gateway.dns import DnsAnswer, DnsStatus, Resolver, ascii_name
from gateway.facts import DmarcOutcome, PublishedPolicy
from gateway.vocab import AuthResult, Stage
from gateway.wire import has_bare_cr_lf, header_section, number

SYMBOLS = ("pass", "fail", "none", "reject", "quarantine", "temperror", "permerror", "malformed")
_psl: PublicSuffixList | None = None


def psl() -> PublicSuffixList:
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()  # the bundled list: offline, loaded once
    return _psl


class DmarcTempError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Undecided:
    """What SPF, DKIM and ARC could not tell this time: an SPF domain whose result was
    a temperror, DKIM signatures (their d=) that could not be verified for a temporary
    reason, the checks that did not complete at all, and a trusted sealer's ARC chain
    that could not be validated (ARC counts only when a trusted sealer could override
    a failure). If any of them could have changed the outcome, a DMARC failure is not
    certain, and a domain's reject or quarantine must not be applied on a transient
    error: the result is a temperror instead."""

    spf_domain: str | None = None
    dkim_domains: tuple[str, ...] = ()
    checks: frozenset[str] = frozenset()
    arc_chain: bool = False  # a trusted (or unnamed) sealer's chain could not be validated


def undecided(ctx: Context, trusted_sealers: frozenset[str]) -> Undecided | None:
    """The context's undecided inputs; None in the common case of none. ARC counts
    only with trusted sealers: only then could its chain change DMARC's outcome."""
    facts = ctx.facts
    spf = facts.spf.domain if facts.spf is not None and facts.spf.result == "temperror" else None
    dkim = tuple(s.domain for s in facts.dkim if s.result == "temperror")
    checks = facts.incomplete & (_INPUTS_WITH_ARC if trusted_sealers else _INPUTS)
    arc = (
        bool(trusted_sealers)
        and facts.arc is not None
        and facts.arc.result == "temperror"
        and (facts.arc.sealer is None or facts.arc.sealer in trusted_sealers)
    )
    if spf is None and not dkim and not checks and not arc:
        return None
    return Undecided(spf, dkim, checks, arc)


_INPUTS = frozenset({"spf", "dkim"})
_INPUTS_WITH_ARC = _INPUTS | {"arc"}


T = TypeVar("T")
# A step of the evaluation: yields DNS questions (name, type), receives the answers.
Evaluation = Generator[tuple[str, str], DnsAnswer, T]


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    domain: str
    p: str
    sp: str | None = None
    np: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    testing: bool = False
    psd: str = "u"
    # RFC 9989 4.10.1: an invalid p, sp or np without a usable rua means "apply no
    # DMARC processing". The record still counts in the tree walk (it exists).
    unusable: bool = False
    # What an aggregate report says of this record, made once with it (cached).
    published: PublishedPolicy | None = None


# A reporting URI with a scheme (RFC 3986), the "syntactically valid" rua 4.10.1 asks for.
_URI = re.compile(r"(?:^|,)\s*[A-Za-z][A-Za-z0-9+.-]*:[^\s,]+")


@functools.lru_cache(maxsize=4096)
def parse_record(domain: str, text: str) -> DmarcRecord | None:
    """The DMARC record, or None if it is not one (`v=DMARC1` is not its first tag).

    RFC 9989 4.7 (as RFC 7489 6.3 before it): unknown tags are ignored, and a syntax
    error in the rest of the record (a word without "=") is discarded, not the record
    with it. Discarding the whole record would hand the domain to its parent's policy:
    a subdomain that says `p=none` with one stray word would get the parent's reject.
    An absent `p` is `p=none` (4.7). An invalid `p`, `sp` or `np` value (4.10.1): with
    a reporting URI in `rua`, the record acts as `p=none`; without one, no DMARC
    processing (`unusable`, reported as a permerror).

    Cached: the record text comes from the DNS cache, the same for every message
    of a domain, and the result is immutable."""
    parts = text.split(";")
    if "".join(parts[0].split()).lower() != "v=dmarc1":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        k, sep, v = part.strip().partition("=")
        if sep:  # a word without "=" is a syntax error: ignored
            tags.setdefault(k.strip().lower(), v.strip())
    policies = ("none", "quarantine", "reject")
    p = tags.get("p", "none").lower()
    sp, np = tags.get("sp", "").lower() or None, tags.get("np", "").lower() or None
    unusable = False
    if p not in policies or sp not in (None, *policies) or np not in (None, *policies):
        p, sp, np = "none", None, None
        unusable = not _URI.search(tags.get("rua", ""))
    psd = tags.get("psd", "u").lower()
    pct = number(tags.get("pct", "100"), 3)
    pct = 100 if pct is None else min(100, pct)
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return DmarcRecord(
        domain=domain,
        p=p,
        sp=sp,
        np=np,
        adkim=adkim,
        aspf=aspf,
        pct=pct,
        testing=tags.get("t", "n").lower() == "y",
        psd=psd if psd in ("y", "n", "u") else "u",
        unusable=unusable,
        published=PublishedPolicy(
            domain=domain,
            p=p,
            sp=sp or p,
            adkim=adkim,
            aspf=aspf,
            pct=pct,
            # Bounded here: both are the domain's to write, and go into every report.
            fo=_FO.sub("", tags.get("fo", "0"))[:16] or "0",
            rua=tags.get("rua", "")[:MAX_RUA],
        ),
    )


# Characters of an fo= value (RFC 7489 6.3: 0, 1, d, s joined by colons).
_FO = re.compile(r"[^01dsDS:]")
# Characters of rua= kept: enough for a few URIs; what follows is never read.
MAX_RUA = 2048


def from_domains(message: bytes) -> list[str] | None:
    """Domains of the From header's addresses; None if there is not exactly one From field."""
    head = header_section(message)
    fields = _plain_from_fields(head)
    if fields is None:  # anything unusual: the email package's parser decides
        # Parsed as UTF-8 text (RFC 6532 headers): the bytes parser would read non-ASCII
        # as unknown octets and hand back a From whose domain is replacement characters.
        # Octets that are not UTF-8 become U+FFFD here (never surrogates, which the
        # parser would wrap in a Header that cannot be printed).
        text = head.decode("utf-8", "replace")
        fields = HeaderParser(policy=email_policy.compat32).parsestr(text).get_all("From") or []
    if len(fields) != 1:
        return None
    return value_domains(str(fields[0]))


_ATEXT = ATEXT
_PLAIN_ADDR = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
# `local@domain` or `Display Name <local@domain>`, with nothing getaddresses treats
# specially: no quotes, comments, commas, groups, encoded words, dots in the name,
# folding or trailing dots.
_NAME = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*"
_PLAIN_FROM = re.compile(rf"[ \t]*(?:{_NAME}<{_PLAIN_ADDR}>|{_PLAIN_ADDR})[ \t]*")


# Characters of a From value the email package's address parser may read (up to
# 3 µs each). A From of more is no From this gateway can judge: malformed.
MAX_FROM_VALUE = 4096


def value_domains(value: str) -> list[str]:
    """The domains of a From value's addresses; [] if any address has none, or if
    the value is past what may be parsed (addrlist.too_complex). A plain single
    address is read by one pattern: getaddresses costs about 15 µs."""
    m = _PLAIN_FROM.fullmatch(value)
    if m is not None:
        return [(m.group(1) or m.group(2)).lower()]
    if too_complex(value, MAX_FROM_VALUE):
        return []
    addrs = getaddresses([value])
    # RFC 9989 5.3.1: a U-label domain is converted to its A-label. One that cannot be
    # (octets that were not UTF-8, characters IDNA refuses) is no domain: the message
    # is then malformed, rather than a look-alike of a real domain that DMARC passes by.
    domains = [
        ascii_name(a.rpartition("@")[2].strip().lower().rstrip(".")) for _, a in addrs if "@" in a
    ]
    if len(domains) != len(addrs) or not all(d.isascii() for d in domains):
        return []
    return domains


_FIELD_START = re.compile(rb"[!-9;-~]+:")  # field name (printable, no colon) and colon


def _plain_from_fields(head: bytes) -> list[str] | None:
    """The From field values of a plain header section, as the email package's
    compat32 parser returns them; None when the section is not plain (non-ASCII,
    a bare CR or LF, a line that is not a field, a leading continuation, an mbox
    "From " line), and the parser's own handling of that must apply.

    The parser costs about 60 µs per message; this scan, 5.
    """
    if not head.isascii() or has_bare_cr_lf(head):
        return None
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            break  # the blank line: end of the header section
        if line[0] in b" \t":
            if not fields:
                return None
            fields[-1].append(line)
        elif _FIELD_START.match(line):
            fields.append([line])
        else:
            return None
    out = []
    for lines in fields:
        name, _, first = lines[0].partition(b":")
        if name.lower() == b"from":
            value = b"\r\n".join([first.lstrip(b" \t"), *lines[1:]]).rstrip(b"\r\n")
            out.append(value.decode("ascii"))
    return out


class DmarcOptions(Strict):
    enabled: bool = True
    # tree-walk: the DMARCbis (RFC 9989) DNS tree walk; psl: RFC 7489 with the
    # Public Suffix List (offline, from the publicsuffixlist package).
    organizational_domain: Literal["psl", "tree-walk"] = "tree-walk"
    # Sealers (ARC-Seal d= domains) whose passing ARC chain may override a DMARC
    # fail, for mailing lists and forwarders you trust. Off (empty) by default.
    trusted_arc_sealers: list[str] = Field(default_factory=list)


class DmarcCheck:
    name: ClassVar[str] = "dmarc"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.DATA})
    symbols: ClassVar[frozenset[str]] = frozenset(f"dmarc.{s}" for s in SYMBOLS)
    reputation: ClassVar[bool] = True
    # DMARC is judged on what these found (RFC 7489 4.2): they run first.
    requires: ClassVar[frozenset[str]] = frozenset({"spf", "dkim", "arc"})
    budget: float | None = None

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.org_method: Literal["psl", "tree-walk"] = "tree-walk"
        self.trusted_sealers: frozenset[str] = frozenset()
        self.rand = random.random

    def configured(self, options: DmarcOptions) -> Self:
        """This check under `options`: a new object (the resolver is shared)."""
        new = copy.copy(self)
        new.org_method = options.organizational_domain
        new.trusted_sealers = frozenset(d.lower().rstrip(".") for d in options.trusted_arc_sealers)
        return new

    def run(self, stage: Stage, ctx: Context) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        """Synchronous when every DNS answer the evaluation needs is cached (repeat
        senders): the evaluation is a generator of DNS questions (`_evaluation`),
        answered from the cache until one is not, then continued by a coroutine."""
        message = ctx.message
        domains = from_domains(message or b"")
        if not domains or len(set(domains)) != 1:
            ctx.auth.append(AuthResult("dmarc", "permerror", {}, "not exactly one From domain"))
            return ("dmarc.malformed",)
        from_domain = domains[0]
        facts = ctx.facts
        dkim_pass = [s.domain for s in facts.dkim if s.result == "pass"]
        spf_domain = (
            facts.spf.domain if facts.spf is not None and facts.spf.result == "pass" else None
        )
        unsure = undecided(ctx, self.trusted_sealers)
        out = self._answer(self._evaluation(from_domain, spf_domain, dkim_pass, unsure))
        if isinstance(out, DmarcOutcome):
            return self._judge(ctx, from_domain, out)
        return self._judge_later(ctx, from_domain, out)

    async def _judge_later(
        self, ctx: Context, from_domain: str, pending: Awaitable[DmarcOutcome]
    ) -> tuple[str, ...]:
        return self._judge(ctx, from_domain, await pending)

    def _judge(self, ctx: Context, from_domain: str, out: DmarcOutcome) -> tuple[str, ...]:
        arc = ctx.facts.arc
        if (
            out.result == "fail"
            and arc is not None
            and arc.result == "pass"
            and arc.sealer in self.trusted_sealers
        ):
            # RFC 8617 7.2 / RFC 7489 6.7: a local-policy override for a trusted sealer.
            out = DmarcOutcome(
                "fail",
                "none",
                out.from_domain,
                out.policy,
                f"overridden: ARC chain sealed by trusted {arc.sealer}",
                out.published,
                overrides=(*out.overrides, "trusted_forwarder"),
            )
        ctx.facts.dmarc = out
        props = {"header.from": from_domain}
        if out.policy:
            props["policy.dmarc"] = out.policy
        ctx.auth.append(AuthResult("dmarc", out.result, props, out.reason))
        symbols = [f"dmarc.{out.result}"]
        if out.result == "fail" and out.disposition in ("reject", "quarantine"):
            symbols.append(f"dmarc.{out.disposition}")
        return tuple(symbols)

    # -- evaluation (the tested entry point) -------------------------------------
    async def evaluate(
        self,
        from_domain: str,
        spf_domain: str | None,
        dkim_domains: list[str],
        unsure: Undecided | None = None,
    ) -> DmarcOutcome:
        out = self._answer(self._evaluation(from_domain, spf_domain, dkim_domains, unsure))
        return out if isinstance(out, DmarcOutcome) else await out

    # The evaluation below is written as generators that yield each DNS question
    # (name, type) and receive its answer; `_answer` and `_ask` feed them.
    def _answer(self, ev: Evaluation[T]) -> T | Awaitable[T]:
        """Run `ev` on cached answers; at the first question the cache cannot answer,
        hand it to a coroutine that asks the resolver from there on."""
        try:
            question = next(ev)
            while True:
                ans = self.resolver.cached(*question)
                if ans is None:
                    return self._ask(ev, question)
                question = ev.send(ans)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _ask(self, ev: Evaluation[T], question: tuple[str, str]) -> T:
        try:
            while True:
                question = ev.send(await self.resolver.query(*question))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _evaluation(
        self,
        from_domain: str,
        spf_domain: str | None,
        dkim_domains: list[str],
        unsure: Undecided | None = None,
    ) -> Evaluation[DmarcOutcome]:
        try:
            record, org = yield from self._discover(from_domain)
        except DmarcTempError as e:
            return DmarcOutcome("temperror", from_domain=from_domain, reason=str(e))
        if record is None:
            return DmarcOutcome("none", from_domain=from_domain, reason="no DMARC record")
        if record.unusable:
            why = f"the DMARC record of {record.domain} has an invalid p, sp or np"
            return DmarcOutcome("permerror", from_domain=from_domain, reason=why)
        try:
            spf_ok = spf_domain is not None and (
                yield from self._aligned(spf_domain, from_domain, org, record.aspf)
            )
            dkim_ok = False
            for d in dkim_domains:
                if (yield from self._aligned(d, from_domain, org, record.adkim)):
                    dkim_ok = True
                    break
        except DmarcTempError as e:
            return DmarcOutcome("temperror", from_domain=from_domain, reason=str(e))
        if spf_ok or dkim_ok:
            why = "aligned " + " and ".join(
                x for x, ok in (("spf", spf_ok), ("dkim", dkim_ok)) if ok
            )
            return DmarcOutcome(
                "pass", "none", from_domain, record.p, why, record.published, spf_ok, dkim_ok
            )
        applicable = record.p
        if from_domain != record.domain:
            applicable = record.sp or record.p
            if record.np and not (yield from self._exists(from_domain)):
                applicable = record.np
        disposition = applicable
        overrides: tuple[str, ...] = ()
        if record.pct < 100 and self.rand() * 100 >= record.pct:
            disposition = _downgrade(disposition)
            overrides += ("sampled_out",)
        if record.testing and _downgrade(disposition) != disposition:
            disposition = _downgrade(disposition)
            overrides += ("testing",)
        if unsure is not None and disposition != "none":
            try:
                why = yield from self._unsure(unsure, from_domain, org, record)
            except DmarcTempError as e:
                why = str(e)
            if why:
                return DmarcOutcome(
                    "temperror", "none", from_domain, applicable, why, record.published
                )
        return DmarcOutcome(
            "fail",
            disposition,
            from_domain,
            applicable,
            "neither SPF nor DKIM aligned with a pass",
            record.published,
            overrides=overrides,
        )

    def _unsure(
        self, unsure: Undecided, from_domain: str, org: str, record: DmarcRecord
    ) -> Evaluation[str]:
        """Why a failure is not certain (an input that could have aligned is unknown);
        empty when it is."""
        if unsure.checks:
            return f"the {' and '.join(sorted(unsure.checks))} check did not complete"
        if unsure.arc_chain:
            return "the ARC chain of a trusted sealer could not be validated (temporary error)"
        spf = unsure.spf_domain
        if spf is not None and (yield from self._aligned(spf, from_domain, org, record.aspf)):
            return f"SPF for {spf} had a temporary error"
        for d in unsure.dkim_domains:
            if (yield from self._aligned(d, from_domain, org, record.adkim)):
                return f"the DKIM signature of {d} could not be verified (temporary error)"
        return ""

    def _aligned(self, domain: str, from_domain: str, org: str, mode: str) -> Evaluation[bool]:
        # An SMTPUTF8 MAIL FROM (or an RFC 8616 d=) may carry U-labels: compared as A-labels.
        domain = ascii_name(domain.lower().rstrip("."))
        if mode == "s":
            return domain == from_domain
        if domain == from_domain:
            return True
        return (yield from self._org_domain(domain)) == org

    def _org_domain(self, domain: str) -> Evaluation[str]:
        if self.org_method == "psl":
            return psl().privatesuffix(domain) or domain
        _, org = yield from self._tree_walk(domain)
        return org

    def _discover(self, from_domain: str) -> Evaluation[tuple[DmarcRecord | None, str]]:
        """The policy record and the From domain's organizational domain."""
        if self.org_method == "tree-walk":
            return (yield from self._tree_walk(from_domain))
        org = psl().privatesuffix(from_domain) or from_domain
        rec = yield from self._record(from_domain)
        if rec is None and org != from_domain:
            rec = yield from self._record(org)
        return rec, org

    def _tree_walk(self, domain: str) -> Evaluation[tuple[DmarcRecord | None, str]]:
        """DMARCbis DNS tree walk: at most 8 queries, from the domain towards the root.

        Policy: the first record found. Organizational domain: where psd=n, or
        one label below a psd=y record, else the highest domain with a record,
        else the domain itself.
        """
        labels = domain.split(".")
        names = [".".join(labels[i:]) for i in range(len(labels))]
        if len(names) > 8:
            names = names[:1] + names[-7:]
        policy: DmarcRecord | None = None
        org: str | None = None
        highest: str | None = None
        previous = domain
        for name in names:
            rec = yield from self._record(name)
            if rec is not None:
                if policy is None:
                    policy = rec
                if rec.psd == "n":
                    org = name
                    break
                if rec.psd == "y":
                    org = previous if previous != name else name
                    break
                highest = name
            previous = name
        return policy, org or highest or domain

    def _record(self, domain: str) -> Evaluation[DmarcRecord | None]:
        ans = yield (f"_dmarc.{domain}", "TXT")
        if ans.temporary:
            raise DmarcTempError(f"DMARC lookup for {domain}: {ans.status.value}")
        if ans.status is not DnsStatus.OK:
            return None
        found = []
        for strings in ans.records:
            text = b"".join(strings).decode("utf-8", "replace")
            if text.replace(" ", "").lower().startswith("v=dmarc1"):
                found.append(text)
        if len(found) != 1:
            return None  # none, or several: RFC 7489 6.6.3 says treat as no record
        return parse_record(domain, found[0])

    def _exists(self, domain: str) -> Evaluation[bool]:
        """For np (RFC 9091 2.1, RFC 9989): a domain is non-existent when its A, AAAA and
        MX lookups each give NXDOMAIN *or NODATA*, a broader test than RFC 8020's. A
        name that holds only other records (TXT, say) does not exist for mail."""
        for rtype in ("A", "AAAA", "MX"):
            ans = yield (domain, rtype)
            if ans.temporary:
                raise DmarcTempError(f"existence of {domain}: {ans.status.value}")
            if ans.status is DnsStatus.OK and ans.records:
                return True
        return False


def _downgrade(disposition: str) -> str:
    return {"reject": "quarantine", "quarantine": "none"}.get(disposition, disposition)
