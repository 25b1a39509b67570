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

from pydantic import Field, PrivateAttr, ValidationError

from gateway.checks.arc import ArcOptions
from gateway.checks.clamav import ClamavOptions
from gateway.checks.dkim import DkimOptions
from gateway.checks.dmarc import DmarcOptions
from gateway.checks.dnsbl import DnsblOptions
from gateway.checks.greylist import GreylistOptions
from gateway.checks.ratelimit import RateLimitOptions
from gateway.checks.rspamd import RspamdOptions
from gateway.checks.spf import SpfOptions
from gateway.checks.tlspolicy import TlsPolicyOptions
from gateway.config import ConfigError, Strict, format_validation_error, read_yaml_mapping
from gateway.rewrite.engine import Rewriter, RuleError
from gateway.rewrite.options import RewriteOptions
from gateway.vocab import Action


class TagSettings(Strict):
    header: str = "X-Gateway-Tag"


class QuarantineSettings(Strict):
    # tag: deliver to the original recipients with the header below;
    # redirect: deliver only to `recipient`, the original recipients in the header.
    mode: Literal["tag", "redirect"] = "tag"
    recipient: str | None = None
    header: str = "X-Gateway-Quarantine"

    def model_post_init(self, _ctx: Any) -> None:
        if self.mode == "redirect" and not self.recipient:
            raise ValueError("mode: redirect needs a recipient")


class CheckOptions(Strict):
    """Per-check switches and options; a check absent here has none (always on)."""

    dnsbl: DnsblOptions = DnsblOptions()
    ratelimit: RateLimitOptions = RateLimitOptions()
    tls: TlsPolicyOptions = TlsPolicyOptions()
    spf: SpfOptions = SpfOptions()
    dkim: DkimOptions = DkimOptions()
    arc: ArcOptions = ArcOptions()
    dmarc: DmarcOptions = DmarcOptions()
    clamav: ClamavOptions = ClamavOptions()
    rspamd: RspamdOptions = RspamdOptions()
    greylist: GreylistOptions = GreylistOptions()


# Actions that hold unless the policy names the symbol (and for relay control,
# a floor the policy cannot go below: an inbound gateway must never relay).
DEFAULT_ACTIONS: dict[str, Action] = {
    "relay.denied": Action.REJECT,
    # Configuring require_tls_* means it is wanted: enforced unless the policy says otherwise.
    "tls.required": Action.REJECT,
}
REFUSE_ONLY = {"relay.denied"}


class Policy(Strict):
    _rewriter: Rewriter | None = PrivateAttr(default=None)
    _files: list[Path] = PrivateAttr(default_factory=list)
    actions: dict[str, Action] = Field(default_factory=dict)
    checks: CheckOptions = CheckOptions()
    tag: TagSettings = TagSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    # Checks an allow-listed client (dnsbl allow zones or allow_networks) skips.
    allowlist_skips: list[str] = Field(
        default_factory=lambda: ["spf", "dkim", "arc", "dmarc", "ratelimit", "greylist"]
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


def resolve(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A preset's name (`strict`) or a policy file's path; a relative path in an
    `extends:` is read from the directory of the file that extends."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return relative_to / p if relative_to is not None and not p.is_absolute() else p
    return presets_dir() / f"{name_or_path}.yaml"


# Policies extending policies extending ...: deeper than this is a mistake.
MAX_EXTENDS = 8


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key (an action, a check's
    option), anything else (a list of limits, a number) replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _inherited(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """The policy file's content on top of what it `extends:` (a preset's name or
    another file), and every file read."""
    data = read_yaml_mapping(path)
    base = data.pop("extends", None)
    if base is None:
        return data, [path]
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: extends: must be a preset name or a policy file's path")
    base_path = resolve(base, path.parent)
    seen = [p.resolve() for p in (*chain, path)]
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: extends: {base}: a policy cannot extend itself (a cycle)")
    if len(seen) >= MAX_EXTENDS:
        raise ConfigError(f"{path}: extends: {base}: over {MAX_EXTENDS} policies deep")
    if not base_path.is_file():
        raise ConfigError(
            f"{path}: extends: {base}: no such file or preset (presets: {', '.join(presets())})"
        )
    base_data, files = _inherited(base_path, (*chain, path))
    return _merge(base_data, data), [path, *files]


class PolicyNotFound(ConfigError):
    """The config's `policy:` names no preset and no file."""


def presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def load(name_or_path: str, known_symbols: set[str]) -> Policy:
    """The policy named in the config, with what it extends; a ConfigError names the
    file and the key."""
    path = resolve(name_or_path)
    if not path.is_file():
        if path.parent == presets_dir() and "/" not in name_or_path:
            raise PolicyNotFound(
                f"policy: {name_or_path!r} is no preset (presets: {', '.join(presets())};"
                " or give a policy file's path)"
            )
        raise PolicyNotFound(f"policy: {path}: no such file")
    data, files = _inherited(path)
    source = (
        str(path) if len(files) == 1 else f"{path} (extending {', '.join(map(str, files[1:]))})"
    )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    unknown = sorted(set(policy.actions) - known_symbols)
    if unknown:
        known = ", ".join(sorted(known_symbols))
        raise ConfigError(f"{source}: actions.{unknown[0]}: unknown symbol (known: {known})")
    try:
        policy._rewriter = Rewriter(policy.rewrite, path.parent)
        policy._files = [*files, *policy._rewriter.files]
    except RuleError as e:
        raise ConfigError(f"{path}: {e}") from None
    return policy
