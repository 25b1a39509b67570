"""Typed settings, validated once at start; every error names the key path.

Infrastructure lives here (listeners, backend, limits, networks); what to do
about what the checks find lives in the policy file (see pipeline/policy.py),
which reloads on SIGHUP without a restart.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from gateway.net import IPNetwork


class ConfigError(Exception):
    """A config problem, already worded for the operator (key path: problem)."""


class Strict(BaseModel):
    """Every settings model: unknown keys are errors (a typo never passes as a
    default), and values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsMode(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class BackendTls(StrEnum):
    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"


class BareLinefeed(StrEnum):
    REJECT = "reject"
    NORMALIZE = "normalize"


def _networks(v: Any) -> list[IPNetwork]:
    if not isinstance(v, list):
        raise ValueError("must be a list of networks")
    out = []
    for item in v:
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError as e:
            raise ValueError(f"{item!r} is not an IP network") from e
    return out


# A list of networks in a config or policy file ("192.0.2.0/24", "2001:db8::/32").
Networks = Annotated[list[IPNetwork], BeforeValidator(_networks)]


def file_signature(paths: list[Path]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced, including a Kubernetes Secret volume's
    symlink swap (stat follows the link to the new target)."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


class SniCertificate(Strict):
    cert_file: Path
    key_file: Path
    # Names this certificate answers (SNI); empty: the DNS names in the certificate.
    names: list[str] = Field(default_factory=list)


class Listener(Strict):
    name: str = "smtp"
    # The address to listen on: one of the machine's, 0.0.0.0 (every IPv4 address)
    # or :: (every address, IPv6 and IPv4: an IPv4 client is named a.b.c.d).
    address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 2525
    tls: TlsMode = TlsMode.NONE
    # The default certificate (also for clients that send no SNI).
    cert_file: Path | None = None
    key_file: Path | None = None
    # More certificates, chosen by the name the client asks for (SNI).
    certificates: list[SniCertificate] = Field(default_factory=list)
    require_tls: bool = False
    min_tls_version: Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    # OpenSSL cipher string for TLS <= 1.2 (null: OpenSSL's defaults). TLS 1.3 suites
    # are all AEAD and Python cannot set them; restrict them in OPENSSL_CONF if needed.
    ciphers: str | None = None
    # Ask for a client certificate (partner links): none, optional, required;
    # verified against client_ca_file.
    client_certificate: Literal["none", "optional", "required"] = "none"
    client_ca_file: Path | None = None
    proxy_protocol: bool = False
    max_connections: Annotated[int, Field(ge=1)] = 1000

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as e:
            raise ValueError(f"{v!r} is not an IP address") from e
        return v

    def model_post_init(self, _ctx: Any) -> None:
        if self.tls is not TlsMode.NONE and (self.cert_file is None or self.key_file is None):
            raise ValueError(f"tls: {self.tls.value} needs cert_file and key_file")
        if self.require_tls and self.tls is TlsMode.NONE:
            raise ValueError("require_tls: true needs tls: starttls or implicit")
        if self.client_certificate != "none" and self.client_ca_file is None:
            raise ValueError(f"client_certificate: {self.client_certificate} needs client_ca_file")
        if self.certificates and self.tls is TlsMode.NONE:
            raise ValueError("certificates need tls: starttls or implicit")


class Limits(Strict):
    max_message_size: Annotated[int, Field(ge=1024)] = 25 * 1024 * 1024
    # Bytes of header fields a message may have (the checks parse them on the event
    # loop). sendmail's default is 32 KiB; heavy real headers (long Received and ARC
    # chains) stay under 64.
    max_header_size: Annotated[int, Field(ge=1024)] = 256 * 1024
    # Header fields a message may have. Every check reads each one (DKIM, ARC, DMARC,
    # the forged-field filter): 50,000 fields of 5 bytes fit in the size limit and
    # cost 300 ms of parsing on the loop. Real messages carry tens, heavy list
    # traffic a few hundred.
    max_header_fields: Annotated[int, Field(ge=10)] = 1000
    # Lines of the header section, continuation lines included: the parsers' work
    # grows with lines as well (65,000 folded lines of one field cost the email
    # package 100 ms); real headers fold a field into a few lines.
    max_header_lines: Annotated[int, Field(ge=10)] = 10_000
    max_recipients: Annotated[int, Field(ge=1)] = 100
    max_command_line: Annotated[int, Field(ge=512)] = 2048
    command_timeout: Annotated[float, Field(gt=0)] = 300.0
    data_timeout: Annotated[float, Field(gt=0)] = 600.0
    max_errors: Annotated[int, Field(ge=1)] = 20
    # NOOP/RSET/VRFY/HELP in a row without a transaction; beyond, each is an error.
    max_junk_commands: Annotated[int, Field(ge=1)] = 100
    bare_linefeed: BareLinefeed = BareLinefeed.REJECT
    # Received fields a message may carry; more is a mail loop (RFC 5321 6.3 asks for
    # a threshold of at least 100).
    max_received_headers: Annotated[int, Field(ge=1)] = 100
    # RFC 5321 / 2920 synchronisation, for untrusted clients: input before our
    # greeting, or after a command that must wait for its reply (after any command
    # in a HELO session), ends the session with 554 5.5.0, as Exim and Postfix 3.9 do.
    enforce_sync: bool = True
    # Seconds to wait before the greeting, watching for clients that talk first.
    greet_pause: Annotated[float, Field(ge=0, le=60)] = 0.0
    proxy_header_timeout: Annotated[float, Field(gt=0)] = 10.0
    # Bytes of message data each process may hold at once (smtp/memory.py); past it
    # 452 4.3.1. None: a quarter of the memory available (the container's limit if
    # lower), shared among the workers.
    max_data_memory: Annotated[int, Field(ge=1024)] | None = None
    # Seconds a MAIL waits for room in that budget before 452 4.3.1, and for which
    # an admitted SIZE= stays pledged to its transaction; 0: refuse at once, pledge
    # nothing. Well under the 5 minutes a client waits for a MAIL reply (RFC 5321
    # 4.5.3.2.2), which must also cover the checks and the backend's reply.
    data_memory_wait: Annotated[float, Field(ge=0, le=120)] = 30.0

    @field_validator("max_data_memory")
    @classmethod
    def _room_for_one(cls, v: int | None, info: ValidationInfo) -> int | None:
        size = info.data.get("max_message_size")
        if v is not None and size is not None and v < size:
            raise ValueError(
                f"{v} is less than max_message_size ({size}):"
                " a message of the largest size could never be taken"
            )
        return v


class CircuitBreaker(Strict):
    failures: Annotated[int, Field(ge=1)] = 5
    # Seconds the breaker stays open before the next transaction tries the target
    # again: a restarted backend takes mail again within this.
    cooldown: Annotated[float, Field(gt=0)] = 5.0


class Backend(Strict):
    url: list[str] = Field(default_factory=lambda: ["maildir:./mail"])
    tls: BackendTls = BackendTls.NONE
    ca_file: Path | None = None
    server_name: str | None = None
    # Our certificate for backends that ask for one (mutual TLS).
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    command_timeout: Annotated[float, Field(gt=0)] = 60.0
    data_timeout: Annotated[float, Field(gt=0)] = 600.0
    # Sessions per target kept connected and greeted ahead of need (forward/pool.py);
    # each goes to one client session and is closed with it.
    pool_size: Annotated[int, Field(ge=0)] = 4
    # Sessions open to each backend target at once from this instance (its workers
    # share them); beyond, a transaction waits up to connect_timeout for one, then
    # 451 4.4.5 (forward/pool.py). None: no cap.
    max_sessions: Annotated[int, Field(ge=1)] | None = 100
    # Backend sessions one client address holds at once (four times that per /24 or
    # /64), per worker; beyond, that client's transaction gets 451 4.4.5. 20: what
    # a Postfix sender opens to one destination by default. None: no cap.
    max_sessions_per_client: Annotated[int, Field(ge=1)] | None = 20
    idle_timeout: Annotated[float, Field(gt=0)] = 30.0
    xclient: bool = True
    xforward: bool = True
    # MAIL goes out with the first RCPT, in one round trip (forward/backend.py,
    # DeferredTransaction); false: passed through at MAIL.
    defer_mail: bool = True
    circuit_breaker: CircuitBreaker = CircuitBreaker()

    @field_validator("url", mode="before")
    @classmethod
    def _url_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("url")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one backend URL is required")
        kinds = {backend_kind(u) for u in v}
        if "maildir" in kinds and len(v) > 1:
            raise ValueError("maildir: cannot be combined with other backends")
        return v


def backend_kind(url: str) -> str:
    if url.startswith("maildir:"):
        if not url[len("maildir:") :]:
            raise ValueError(f"{url!r}: maildir: needs a path")
        return "maildir"
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "lmtp"):
        raise ValueError(f"{url!r}: scheme must be smtp://, lmtp:// or maildir:")
    if not parts.hostname:
        raise ValueError(f"{url!r}: missing host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise ValueError(f"{url!r}: bad port") from e
    return parts.scheme


class Metrics(Strict):
    listen: str | None = "127.0.0.1:9125"
    # Where worker processes share metric values (workers > 1); default: a temp dir.
    multiproc_dir: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            split_hostport(v)
        return v


class Dns(Strict):
    # "ip" or "ip:port" ("[v6]:port"); empty: the system's resolv.conf.
    nameservers: list[str] = Field(default_factory=list)
    timeout: Annotated[float, Field(gt=0)] = 2.0  # per query, retries included
    cache_size: Annotated[int, Field(ge=0)] = 50_000
    negative_ttl: Annotated[float, Field(ge=0)] = 60.0
    max_ttl: Annotated[float, Field(gt=0)] = 3600.0

    @field_validator("nameservers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for s in v:
            try:
                parse_nameserver(s)
            except ValueError:
                raise ValueError(f"{s!r} is not ip, ip:port or [ipv6]:port") from None
        return v


class Store(Strict):
    """Where rate and concurrency limits keep their counts."""

    # redis://[:password@]host:port/db, rediss:// (TLS) or unix://path; unset: in
    # memory, in a table the workers of this machine share (store/shared.py).
    redis_url: str | None = None
    key_prefix: str = "smtp-gateway:"
    timeout: Annotated[float, Field(gt=0)] = 0.5  # seconds per Redis operation
    # A concurrency slot held by a replica that died is freed after this many seconds.
    lease_ttl: Annotated[float, Field(ge=1)] = 30.0

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{v!r}: scheme must be redis://, rediss:// or unix://")
        return v


class Logging(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "kv"] = "json"


class ReportRelay(Strict):
    """Where DMARC aggregate reports are handed over for delivery."""

    # smtp://host:port of a submission server; null: the first smtp:// URL of
    # backend.url (which must then relay mail from the gateway to other domains).
    url: str | None = None
    # STARTTLS to the relay: none, opportunistic (when offered) or required.
    tls: BackendTls = BackendTls.OPPORTUNISTIC
    # CA bundle that verifies the relay's certificate; null: the system's. With
    # tls: opportunistic and no ca_file, the certificate is not verified.
    ca_file: Path | None = None
    # AUTH PLAIN (only ever over TLS): the user, and a file holding the password.
    username: str | None = None
    password_file: Path | None = None
    timeout: Annotated[float, Field(gt=0)] = 60.0  # seconds per command, the message too

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme != "smtp" or not parts.hostname:
                raise ValueError(f"{v!r}: must be smtp://host:port")
            try:
                parts.port  # noqa: B018 - validates the port
            except ValueError as e:
                raise ValueError(f"{v!r}: bad port") from e
        return v

    def model_post_init(self, _ctx: Any) -> None:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        if self.username is not None and self.tls is BackendTls.NONE:
            raise ValueError("AUTH needs TLS: set tls: required (or opportunistic)")


class DmarcReports(Strict):
    """DMARC aggregate reports (RFC 7489 7.2): what the gateway sends to the domains
    whose DMARC records ask for them (rua=mailto:...)."""

    # Record each DMARC evaluation and send the reports. Off: nothing is recorded.
    enabled: bool = False
    # sqlite: a file on this machine, shared by its workers (created on start);
    # redis: store.redis_url, shared by replicas (one of them sends each run).
    store: Literal["sqlite", "redis"] = "sqlite"
    # The SQLite file of store: sqlite; it and its folder are made on start.
    sqlite_path: Path = Path("/var/lib/smtp-gateway/dmarc.sqlite")
    # Seconds each report covers, aligned to UTC midnight: a divisor of 86400
    # (3600, 21600, 86400, ...). RFC 7489 asks for daily at least.
    interval: Annotated[int, Field(ge=60, le=86400)] = 86400
    # Seconds after an interval ends before its reports are made: every worker's
    # and replica's evaluations of it are in the store by then.
    send_delay: Annotated[float, Field(ge=0, le=86400)] = 600.0
    # Seconds between writes of the evaluations buffered in memory to the store.
    flush_interval: Annotated[float, Field(gt=0, le=300)] = 5.0
    # The reporting organisation (report_metadata/org_name); null: hostname.
    org_name: str | None = None
    # The address reports come from (From:, report_metadata/email); its domain is the
    # Submitter in the subject and the receiver in the file name. Required when on.
    email: str | None = None
    # More ways to reach the reporting organisation (a URL, say), in every report.
    extra_contact_info: str | None = None
    # Destinations used of each domain's rua (mailto: only; RFC 7489 asks for two).
    max_uris: Annotated[int, Field(ge=1, le=10)] = 2
    # Records (rows) in one report; the least frequent beyond are left out (an
    # <error> in the report says how many).
    max_records: Annotated[int, Field(ge=1)] = 10_000
    # Policy domains reported per interval (all reports of a domain count as one,
    # ranked by their sum); the ones with the least mail beyond are dropped.
    max_domains: Annotated[int, Field(ge=1)] = 1000
    # Distinct rows the store keeps per interval; evaluations beyond are dropped and
    # counted (smtp_gateway_dmarc_evaluations_dropped_total).
    max_rows: Annotated[int, Field(ge=1)] = 200_000
    # Distinct rows the store keeps per interval for the policy domains of one
    # organisational domain (example.org with its subdomains): one sender's unique
    # rows fill its own share, not the whole store. Beyond, its new rows are dropped
    # and counted, and its report says how many. In a process's buffer a domain
    # holds at most a tenth of max_pending, or this if less.
    max_rows_per_domain: Annotated[int, Field(ge=1)] = 10_000
    # Distinct rows a process buffers between flushes; beyond, dropped and counted.
    max_pending: Annotated[int, Field(ge=1)] = 20_000
    # Bytes of one report message (the gzip attachment, base64, headers): larger is
    # never sent, as with a smaller rua size limit (mailto:...!10m). Also the bytes
    # of a report's XML: the least frequent records beyond are left out (an <error>
    # says how many), so that making one report is bounded work.
    max_report_size: Annotated[int, Field(ge=1024)] = 10 * 1024 * 1024
    # Runs a report whose hand-over failed for a temporary reason (relay down, 4xx)
    # is tried again at, before it is dropped.
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    relay: ReportRelay = ReportRelay()

    @field_validator("interval")
    @classmethod
    def _aligned(cls, v: int) -> int:
        if 86400 % v:
            raise ValueError(f"{v} does not divide a day (86400): reports align to UTC days")
        return v

    def model_post_init(self, _ctx: Any) -> None:
        if self.enabled and not self.email:
            raise ValueError("email: required when enabled (the reports' From address)")
        if self.email is not None and not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", self.email):
            raise ValueError(f"email: {self.email!r} is not an address")
        if self.email is not None:
            # Its domain names the Submitter in every report's Subject and file name.
            domain = self.email.rpartition("@")[2].lower()
            if not (domain.isascii() and _is_domain(domain)):
                raise ValueError(f"email: {domain!r} is not a host name")


class Settings(Strict):
    hostname: str = Field(default_factory=socket.getfqdn)
    listeners: list[Listener] = Field(default_factory=lambda: [Listener()])
    local_domains: list[str] = Field(default_factory=lambda: ["localhost"])
    trusted_networks: list[IPNetwork] = Field(
        default_factory=lambda: _networks(["127.0.0.0/8", "::1/128"])
    )
    proxy_networks: list[IPNetwork] = Field(default_factory=list)
    limits: Limits = Limits()
    backend: Backend = Backend()
    metrics: Metrics = Metrics()
    logging: Logging = Logging()
    dns: Dns = Dns()
    store: Store = Store()
    # Our name in Authentication-Results (RFC 8601); default: hostname.
    authserv_id: str | None = None
    policy: str = "default"
    drain_timeout: Annotated[float, Field(ge=0)] = 30.0
    # Seconds between checks of the certificate files for a renewal (0: never).
    tls_reload_interval: Annotated[float, Field(ge=0)] = 10.0
    # Seconds between checks of the policy file and its tables for a change, which
    # reloads it as SIGHUP does (0: only on SIGHUP). Kubernetes ConfigMaps change so.
    policy_reload_interval: Annotated[float, Field(ge=0)] = 10.0
    # Worker processes sharing the listeners; null: one per CPU available to us.
    workers: Annotated[int, Field(ge=1, le=256)] | None = None
    # DMARC aggregate reports (docs/dmarc-reports.md); off by default.
    dmarc_reports: DmarcReports = DmarcReports()

    @field_validator("trusted_networks", "proxy_networks", mode="before")
    @classmethod
    def _nets(cls, v: Any) -> list[IPNetwork]:
        return _networks(v)

    @field_validator("local_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = []
        for d in v:
            d = d.strip().lower()
            body = d[2:] if d.startswith("*.") else d
            if not _is_domain(body):
                raise ValueError(f"{d!r} is not a domain or *.domain wildcard")
            out.append(d)
        return out

    def model_post_init(self, _ctx: Any) -> None:
        names = [x.name for x in self.listeners]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ValueError(f"listeners: names must be unique ({twice!r} is used twice)")
        problem = _listening_problem(self)
        if problem is not None:
            raise ValueError(problem)
        problem = _reports_problem(self)
        if problem is not None:
            raise ValueError(problem)


# A label of a host name: letters, digits, hyphens inside (RFC 1123 2.1); the
# underscore too, which some sites use in internal names.
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _is_domain(name: str) -> bool:
    """A domain name we can match mail against: labels of at most 63 characters,
    none empty (`example..test`), 253 in all; an internationalised name in its
    Unicode or its A-label form."""
    if not name or len(name) > 253:
        return False
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _overlap(a: str, b: str) -> bool:
    """Two listening addresses that cannot both be bound on one port: the same, one
    the other's family's wildcard, or :: (every address of both families) with any."""
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if x == y or (x.version == 6 and x.is_unspecified) or (y.version == 6 and y.is_unspecified):
        return True
    return x.version == y.version and (x.is_unspecified or y.is_unspecified)


def _listening_problem(s: Settings) -> str | None:
    """What would make the gateway refuse every connection or fail to start, found
    before it starts: the message begins with the key to change."""
    if not s.listeners:
        return "listeners: at least one listener is needed (no mail could come in)"
    taken: list[tuple[str, str, int]] = []
    for i, lc in enumerate(s.listeners):
        if lc.proxy_protocol and not s.proxy_networks:
            return (
                f"listeners.{i}.proxy_protocol: true needs proxy_networks (the load "
                "balancers' addresses): every connection would be refused"
            )
        for where, address, port in taken:
            if port == lc.port and port != 0 and _overlap(address, lc.address):
                return f"listeners.{i}: {lc.address} port {lc.port} is also {where}'s"
        taken.append((f"listeners.{i}", lc.address, lc.port))
    if s.metrics.listen is not None:
        host, port = split_hostport(s.metrics.listen)
        for where, address, lport in taken:
            if port == lport and port != 0 and _overlap(address, host):
                return f"metrics.listen: {s.metrics.listen} is also {where}'s address and port"
    return None


def _reports_problem(s: Settings) -> str | None:
    """DMARC reports on with nowhere to keep or send them."""
    r = s.dmarc_reports
    if not r.enabled:
        return None
    if r.store == "redis" and not s.store.redis_url:
        return "dmarc_reports.store: redis needs store.redis_url"
    if r.relay.url is None and not any(u.startswith("smtp:") for u in s.backend.url):
        return (
            "dmarc_reports.relay.url: required: the backend is not smtp:// (a maildir or "
            "an LMTP server delivers locally and cannot send reports to other domains)"
        )
    return None


# Infrastructure keys a container may set from its environment.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "GATEWAY_LISTEN": ("listeners", "0", "address+port"),
    "GATEWAY_BACKEND_URL": ("backend", "url"),
    "GATEWAY_METRICS_LISTEN": ("metrics", "listen"),
    "GATEWAY_HOSTNAME": ("hostname",),
    "GATEWAY_POLICY": ("policy",),
    "GATEWAY_LOG_FORMAT": ("logging", "format"),
    "GATEWAY_WORKERS": ("workers",),
    "GATEWAY_DNS_NAMESERVERS": ("dns", "nameservers"),
    "GATEWAY_REDIS_URL": ("store", "redis_url"),
}


def parse_nameserver(spec: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '[2001:db8::53]:53' or '2001:db8::53'."""
    if spec.startswith("["):
        host, _, port = spec[1:].partition("]")
        return str(ipaddress.ip_address(host)), int(port.lstrip(":") or 53)
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return str(ipaddress.ip_address(host)), int(port)
    return str(ipaddress.ip_address(spec)), 53


def split_hostport(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{v!r} must be HOST:PORT")
    host = host.strip("[]")
    ipaddress.ip_address(host)
    return host, int(port)


def _apply_env(raw: dict[str, Any], env: dict[str, str]) -> None:
    for var, path in ENV_OVERRIDES.items():
        if var not in env:
            continue
        value = env[var]
        if path[-1] == "address+port":
            try:
                host, port = split_hostport(value)
            except ValueError as e:
                raise ConfigError(f"{var}: {e}") from None
            listeners = raw.setdefault("listeners", [{}])
            if not listeners:
                listeners.append({})
            listeners[0]["address"], listeners[0]["port"] = host, port
            continue
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if path in (("backend", "url"), ("dns", "nameservers")):
            node[path[-1]] = [u.strip() for u in value.split(",") if u.strip()]
        elif path == ("metrics", "listen") and value.lower() in ("", "off", "none"):
            node[path[-1]] = None
        else:
            node[path[-1]] = value


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        # A problem of several keys together names the key to change itself.
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: empty mapping)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load(path: str | Path | None, env: dict[str, str] | None = None) -> Settings:
    """Read, merge environment overrides, validate. Raises ConfigError."""
    source = str(path) if path else "(embedded defaults)"
    raw = read_yaml_mapping(Path(path)) if path is not None else {}
    _apply_env(raw, dict(os.environ) if env is None else env)
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
