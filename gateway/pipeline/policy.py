"""The policy file: which action each check symbol gets. Hot-reloadable.

Presets ship in `policies/`; `policy:` in the config names a preset or a path.
Unknown keys and unknown symbols are errors naming the key, so a typo in
`relay.denid: reject` cannot silently leave a hole.
"""

from __future__ import annotations

from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from gateway.checks.ratelimit import parse_rate
from gateway.config import ConfigError, Networks, format_validation_error, read_yaml_mapping
from gateway.rewrite.engine import Rewriter, RuleError
from gateway.rewrite.options import RewriteOptions
from gateway.vocab import Action


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TagSettings(_Strict):
    header: str = "X-Gateway-Tag"


class QuarantineSettings(_Strict):
    # tag: deliver to the original recipients with the header below;
    # redirect: deliver only to `recipient`, the original recipients in the header.
    mode: Literal["tag", "redirect"] = "tag"
    recipient: str | None = None
    header: str = "X-Gateway-Quarantine"

    def model_post_init(self, _ctx: Any) -> None:
        if self.mode == "redirect" and not self.recipient:
            raise ValueError("mode: redirect needs a recipient")


class SpfOptions(_Strict):
    enabled: bool = True
    # Seconds a verdict is reused for the same client IP and identity.
    result_cache_ttl: Annotated[float, Field(ge=0)] = 60.0
    # Overall DNS time for one evaluation (RFC 7208 4.6.4 suggests at least 20).
    timeout: Annotated[float, Field(gt=0)] = 10.0


class DkimOptions(_Strict):
    enabled: bool = True
    # Signatures verified per message; more are ignored (a cheap DoS otherwise).
    max_signatures: Annotated[int, Field(ge=1, le=50)] = 5


class DmarcOptions(_Strict):
    enabled: bool = True
    # tree-walk: the DMARCbis (RFC 9989) DNS tree walk; psl: RFC 7489 with the
    # Public Suffix List (offline, from the publicsuffixlist package).
    organizational_domain: Literal["psl", "tree-walk"] = "tree-walk"
    # Sealers (ARC-Seal d= domains) whose passing ARC chain may override a DMARC
    # fail, for mailing lists and forwarders you trust. Off (empty) by default.
    trusted_arc_sealers: list[str] = Field(default_factory=list)


class ArcOptions(_Strict):
    enabled: bool = True


class DnsblZone(_Strict):
    name: str  # in logs and metrics labels (never the zone, which may hold an access key)
    zone: str
    # ip: the client address (reversed); helo: the HELO name; mail_from: the sender domain.
    type: Literal["ip", "helo", "mail_from"] = "ip"
    weight: float = 1.0  # negative: an allow list
    # Return codes that count: "127.0.0.2", "127.0.0.8/29", "bitmask:0x04". Empty: any 127/8.
    codes: list[str] = Field(default_factory=list)
    # Shown in the reply instead of the zone and its TXT (hides paid-list access keys).
    reply_text: str | None = None
    use_txt: bool = True  # add the zone's TXT reason to the reply

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        import ipaddress

        for c in v:
            try:
                if c.startswith("bitmask:"):
                    int(c.split(":", 1)[1], 0)
                elif "/" in c:
                    ipaddress.ip_network(c, strict=False)
                else:
                    ipaddress.ip_address(c)
            except ValueError:
                raise ValueError(f"{c!r}: use an address, a CIDR range or bitmask:0xNN") from None
        return v


class DnsblOptions(_Strict):
    enabled: bool = True
    zones: list[DnsblZone] = Field(default_factory=list)
    threshold: float = 1.0  # score at which a client is dnsbl.listed
    deadline: Annotated[float, Field(gt=0)] = 2.0  # for all zones of one stage together
    allow_networks: Networks = Field(default_factory=list)  # treated as allow-listed
    health_interval: Annotated[float, Field(gt=0)] = 300.0  # RFC 5782 test-entry checks


_KEY_PARTS = {
    "client_ip",
    "client_network",
    "mail_from",
    "mail_from_domain",
    "recipient",
    "recipient_domain",
}


# Limit names appear in metric labels and in operators' keys (`NAME:VALUE`).
LimitName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class RateLimit(_Strict):
    name: LimitName  # in logs and metrics labels
    # Parts joined with '+': client_ip, client_network (/24, /64), mail_from,
    # mail_from_domain, recipient, recipient_domain.
    key: str = "client_ip"
    unit: Literal["connections", "messages", "recipients", "bytes"] = "messages"
    # N per period: up to N at once, refilled continuously (N/second|minute|hour|day,
    # or N/<seconds>s); burst: extra units allowed at once on top of N.
    rate: str = "100/minute"
    burst: Annotated[int, Field(ge=0)] = 0
    exempt_networks: Networks = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        bad = [p for p in v.split("+") if p not in _KEY_PARTS]
        if bad:
            raise ValueError(f"unknown key part {bad[0]!r} (use {', '.join(sorted(_KEY_PARTS))})")
        return v

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str) -> str:
        try:
            parse_rate(v)
        except (ValueError, KeyError):
            raise ValueError(f"{v!r}: use N/second, N/minute, N/hour, N/day or N/10s") from None
        return v


class Concurrency(_Strict):
    name: LimitName
    key: Literal["client_ip", "client_network"] = "client_ip"
    max: Annotated[int, Field(ge=1)] = 20
    exempt_networks: Networks = Field(default_factory=list)


def _default_concurrency() -> list[Concurrency]:
    """Sessions at once per client address and per /24 (/64): well below a
    listener's max_connections (1000), so no one client, nor one network, can hold
    every slot (Postfix's smtpd_client_connection_count_limit is 50)."""
    return [
        Concurrency(name="conns_per_ip", key="client_ip", max=50),
        Concurrency(name="conns_per_network", key="client_network", max=150),
    ]


class RateLimitOptions(_Strict):
    enabled: bool = True
    limits: list[RateLimit] = Field(default_factory=list)
    concurrency: list[Concurrency] = Field(default_factory=_default_concurrency)

    def model_post_init(self, _ctx: Any) -> None:
        names = [x.name for x in self.limits] + [x.name for x in self.concurrency]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"limit name {dup!r} is used twice")


class TlsPolicyOptions(_Strict):
    enabled: bool = True
    require_tls_from: list[str] = Field(default_factory=list)  # sender domains, *.wildcards
    require_tls_networks: Networks = Field(default_factory=list)  # client networks
    require_tls_to: list[str] = Field(default_factory=list)  # local recipient domains


class CheckOptions(_Strict):
    """Per-check switches and options; a check absent here has none (always on)."""

    dnsbl: DnsblOptions = DnsblOptions()
    ratelimit: RateLimitOptions = RateLimitOptions()
    tls: TlsPolicyOptions = TlsPolicyOptions()
    spf: SpfOptions = SpfOptions()
    dkim: DkimOptions = DkimOptions()
    arc: ArcOptions = ArcOptions()
    dmarc: DmarcOptions = DmarcOptions()


# Actions that hold unless the policy names the symbol (and for relay control,
# a floor the policy cannot go below: an inbound gateway must never relay).
DEFAULT_ACTIONS: dict[str, Action] = {
    "relay.denied": Action.REJECT,
    # Configuring require_tls_* means it is wanted: enforced unless the policy says otherwise.
    "tls.required": Action.REJECT,
}
REFUSE_ONLY = {"relay.denied"}


class Policy(_Strict):
    _rewriter: Rewriter | None = PrivateAttr(default=None)
    _files: list[Path] = PrivateAttr(default_factory=list)
    actions: dict[str, Action] = Field(default_factory=dict)
    checks: CheckOptions = CheckOptions()
    tag: TagSettings = TagSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    # Checks an allow-listed client (dnsbl allow zones or allow_networks) skips.
    allowlist_skips: list[str] = Field(
        default_factory=lambda: ["spf", "dkim", "arc", "dmarc", "ratelimit"]
    )
    rewrite: RewriteOptions = RewriteOptions()
    check_timeout: Annotated[float, Field(gt=0)] = 10.0
    # What a check that crashes or overruns its time budget means.
    check_error_action: Action = Action.TEMPFAIL

    def model_post_init(self, _ctx: Any) -> None:
        for sym in REFUSE_ONLY:
            act = self.actions.get(sym)
            if act is not None and act not in (Action.REJECT, Action.TEMPFAIL):
                raise ValueError(f"actions.{sym}: must be reject or tempfail (no open relay)")

    @property
    def files(self) -> list[Path]:
        """The policy file and the table files it reads (what a reload re-reads)."""
        return list(self._files)

    @cached_property
    def rewriter(self) -> Rewriter:
        """The rewrite tables, built (and their files read) when the policy is loaded.

        Cached in the instance: a pydantic private attribute costs a __getattr__
        fallback per read, and this is read on every MAIL and RCPT.
        """
        if self._rewriter is None:
            self._rewriter = Rewriter(self.rewrite, Path("."))
        return self._rewriter

    def options(self, check: str) -> Any:
        return getattr(self.checks, check, None)

    def enabled(self, check: str) -> bool:
        opts = self.options(check)
        return opts is None or bool(opts.enabled)

    def action_for(self, symbol: str) -> Action:
        action = self.actions.get(symbol) or DEFAULT_ACTIONS.get(symbol)
        if action is not None:
            return action
        if symbol.endswith((".error", ".timeout")):
            return self.check_error_action
        return Action.ACCEPT


def presets_dir() -> Path:
    """Installed wheels carry the presets inside the package; a checkout has them at the top."""
    packaged = resources.files("gateway") / "policies"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "policies"


def resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return p
    return presets_dir() / f"{name_or_path}.yaml"


def load(name_or_path: str, known_symbols: set[str]) -> Policy:
    path = resolve(name_or_path)
    data = read_yaml_mapping(path)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
    unknown = sorted(set(policy.actions) - known_symbols)
    if unknown:
        known = ", ".join(sorted(known_symbols))
        raise ConfigError(f"{path}: actions.{unknown[0]}: unknown symbol (known: {known})")
    try:
        policy._rewriter = Rewriter(policy.rewrite, path.parent)
        policy._files = [path, *policy._rewriter.files]
    except RuleError as e:
        raise ConfigError(f"{path}: {e}") from None
    return policy
