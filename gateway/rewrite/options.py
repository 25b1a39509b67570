"""The `rewrite:` section of the policy file (validated; hot-reloaded with the policy)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from gateway.config import Strict


class Canonical(Strict):
    # KEY: VALUE; keys: user@domain, user, @domain, /regex/ ($1 in the value).
    rules: dict[str, str] = Field(default_factory=dict)
    # A file of `KEY VALUE` lines (relative to the policy file), read on every reload.
    file: str | None = None
    envelope: bool = True
    headers: bool = False  # sender: From, Sender, Reply-To; recipient: To, Cc


class VirtualAlias(Strict):
    # KEY: VALUE or [VALUE, ...]: the recipient becomes these addresses (fan-out),
    # looked up again for each (recursive); an address that maps to itself stays.
    rules: dict[str, str | list[str]] = Field(default_factory=dict)
    file: str | None = None
    max_depth: Annotated[int, Field(ge=1, le=50)] = 10
    max_expansion: Annotated[int, Field(ge=1, le=1000)] = 100


class Masquerade(Strict):
    # host.dept.example.org -> example.org for senders under these domains (in order).
    domains: list[str] = Field(default_factory=list)
    exceptions: list[str] = Field(default_factory=list)  # local parts never masqueraded
    exclude_domains: list[str] = Field(default_factory=list)  # subdomains left as they are
    envelope: bool = True
    headers: bool = True  # From, Sender, Reply-To


class SrsSettings(Strict):
    enabled: bool = False
    domain: str | None = None  # ours, and in local_domains (bounces come back to it)
    # The first secret signs, all verify (rotation). Or secrets_file: one per line.
    secrets: list[str] = Field(default_factory=list)
    secrets_file: str | None = None
    max_age_days: Annotated[int, Field(ge=1, le=1000)] = 21
    # base32 characters of HMAC-SHA1 (5 bits each): 12 is 60 bits (rewrite/srs.py).
    hash_length: Annotated[int, Field(ge=8, le=32)] = 12

    def model_post_init(self, _ctx: Any) -> None:
        if self.enabled and not self.domain:
            raise ValueError("srs.enabled needs srs.domain")
        if self.enabled and not (self.secrets or self.secrets_file):
            raise ValueError("srs.enabled needs secrets or secrets_file")


class RewriteOptions(Strict):
    subaddress_delimiter: str = "+"  # "" turns sub-addressing off
    subaddress: Literal["keep", "strip"] = "keep"
    # Header naming the original recipient when rewriting changed it; only for a
    # single-recipient transaction (with several it would show Bcc recipients to all).
    original_recipient_header: Annotated[str, Field(pattern=r"^[!-9;-~]{1,76}$")] | None = None
    canonical_sender: Canonical = Canonical()
    canonical_recipient: Canonical = Canonical()
    virtual_alias: VirtualAlias = VirtualAlias()
    masquerade: Masquerade = Masquerade()
    srs: SrsSettings = SrsSettings()
