"""Listener TLS: contexts built from the config, certificates by SNI, hot reload.

Every handshake goes through one dispatcher context per listener whose SNI
callback (OpenSSL calls it for every ClientHello, with or without SNI) hands
the connection the current certificate for the name asked. Reloading swaps
the per-certificate contexts the callback picks from: new handshakes get the
new certificate, established sessions keep theirs, and nothing is rebound.
Protocol limits, ciphers and client-certificate checks live on the dispatcher
and do not change on reload (they are config, and config needs a restart).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from gateway import config, logs, metrics

log = logging.getLogger("gateway.tls")

VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


class TlsConfigError(config.ConfigError):
    pass


@dataclass(frozen=True, slots=True)
class _Loaded:
    ctx: ssl.SSLContext
    names: tuple[str, ...]
    not_after: float
    label: str


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problem = "no such file"
    except PermissionError:
        problem = "not readable by this user (permission denied)"
    except IsADirectoryError:
        problem = "a directory, not a file"
    except OSError as e:
        problem = f"cannot read: {e.strerror}"
    raise TlsConfigError(f"{where}: {path}: {problem}")


def diagnose(cert: Path, key: Path, where: str) -> TlsConfigError:
    """Why a certificate and key cannot be loaded, in words that name the config key
    and the file (OpenSSL says `[SSL] PEM lib` for most of it)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        cert_pem = _read(cert, f"{where}.cert_file")
        key_pem = _read(key, f"{where}.key_file")
    except TlsConfigError as e:
        return e
    try:
        parsed = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return TlsConfigError(f"{where}.cert_file: {cert}: no PEM certificate in it")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return TlsConfigError(
            f"{where}.key_file: {key}: the key is encrypted (give it without a passphrase)"
        )
    except (ValueError, UnsupportedAlgorithm):
        return TlsConfigError(f"{where}.key_file: {key}: no PEM private key in it")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, spki) != parsed.public_key().public_bytes(der, spki):
        return TlsConfigError(
            f"{where}.key_file: {key}: not the private key of {where}.cert_file ({cert})"
        )
    return TlsConfigError(f"{where}.cert_file: {cert}: cannot load certificate/key")


def _load(
    ctx: ssl.SSLContext, cert: Path, key: Path, names: list[str], label: str, where: str
) -> _Loaded:
    from cryptography import x509  # only where a listener has TLS

    try:
        ctx.load_cert_chain(str(cert), str(key))
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ssl.SSLError, ValueError):
        raise diagnose(cert, key, where) from None
    if not names:
        try:
            san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = list(san.value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = []
    return _Loaded(
        ctx,
        tuple(n.lower().rstrip(".") for n in names),
        parsed.not_valid_after_utc.timestamp(),
        label,
    )


class ListenerTls:
    def __init__(self, listener: config.Listener, index: int = 0, export: bool = True) -> None:
        self.cfg = listener
        self.name = listener.name
        self.where = f"listeners.{index}"  # the config key, in errors
        assert listener.cert_file is not None and listener.key_file is not None
        self.context = self._dispatcher()
        self._default, self._by_name, self._wild = self._build()
        self._files = self._paths()
        self._seen = config.file_signature(self._files)
        if export:  # not from a process that only validates (the workers' master)
            self._export_expiry()
            for result in ("ok", "failed"):
                metrics.child(metrics.TLS_CERT_RELOADS, self.name, result)  # exported as 0

    def _paths(self) -> list[Path]:
        c = self.cfg
        assert c.cert_file is not None and c.key_file is not None
        return [c.cert_file, c.key_file] + [
            p for s in c.certificates for p in (s.cert_file, s.key_file)
        ]

    def _dispatcher(self) -> ssl.SSLContext:
        c = self.cfg
        ctx = self._new_context()
        assert c.cert_file is not None and c.key_file is not None
        try:
            ctx.load_cert_chain(str(c.cert_file), str(c.key_file))
        except (OSError, ssl.SSLError):
            raise diagnose(c.cert_file, c.key_file, self.where) from None
        ctx.sni_callback = self._pick
        return ctx

    def _new_context(self) -> ssl.SSLContext:
        """Every context gets the listener's settings: the SNI switch hands the
        connection the chosen context's certificate *and* its verification store."""
        c = self.cfg
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = VERSIONS[c.min_tls_version]
        if c.min_tls_version in ("TLSv1", "TLSv1.1"):
            # OpenSSL 3's default security level refuses them even when allowed here.
            ctx.set_ciphers((c.ciphers or "DEFAULT") + ":@SECLEVEL=0")
        elif c.ciphers:
            try:
                ctx.set_ciphers(c.ciphers)
            except ssl.SSLError:
                raise TlsConfigError(
                    f"{self.where}.ciphers: no cipher matches {c.ciphers!r}"
                ) from None
        if c.client_certificate != "none":
            assert c.client_ca_file is not None
            try:
                ctx.load_verify_locations(cafile=str(c.client_ca_file))
            except (OSError, ssl.SSLError) as e:
                raise TlsConfigError(
                    f"{self.where}.client_ca_file: {c.client_ca_file}: cannot load: {e}"
                ) from None
            ctx.verify_mode = (
                ssl.CERT_REQUIRED if c.client_certificate == "required" else ssl.CERT_OPTIONAL
            )
        return ctx

    def _build(self) -> tuple[_Loaded, dict[str, _Loaded], dict[str, _Loaded]]:
        c = self.cfg
        assert c.cert_file is not None and c.key_file is not None
        default = _load(
            self._new_context(),
            c.cert_file,
            c.key_file,
            [],
            "default",
            self.where,
        )
        by_name: dict[str, _Loaded] = {}
        wild: dict[str, _Loaded] = {}
        for i, s in enumerate(c.certificates):
            where = f"{self.where}.certificates.{i}"
            loaded = _load(
                self._new_context(), s.cert_file, s.key_file, s.names, f"sni-{i + 1}", where
            )
            for n in loaded.names:
                if n.startswith("*."):
                    wild.setdefault(n[2:], loaded)
                else:
                    by_name.setdefault(n, loaded)
        return default, by_name, wild

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        chosen = self._default
        if server_name:
            name = server_name.lower().rstrip(".")
            hit = self._by_name.get(name)
            if hit is None and "." in name:
                hit = self._wild.get(name.split(".", 1)[1])
            if hit is not None:
                chosen = hit
        sslobj.context = chosen.ctx

    def _all(self) -> list[_Loaded]:
        seen: dict[int, _Loaded] = {id(self._default): self._default}
        for x in (*self._by_name.values(), *self._wild.values()):
            seen.setdefault(id(x), x)
        return list(seen.values())

    def _export_expiry(self) -> None:
        for loaded in self._all():
            metrics.child(metrics.TLS_CERT_EXPIRY, self.name, loaded.label).set(loaded.not_after)

    def reload_if_changed(self) -> bool | None:
        """True: reloaded; False: changed but broken (old kept); None: unchanged."""
        sig = config.file_signature(self._files)
        if sig == self._seen:
            return None
        self._seen = sig
        try:
            built = self._build()
        except TlsConfigError as e:
            metrics.child(metrics.TLS_CERT_RELOADS, self.name, "failed").inc()
            logs.failure("tls_reload_failed", listener=self.name, error=str(e))
            return False
        self._default, self._by_name, self._wild = built
        self._export_expiry()
        metrics.child(metrics.TLS_CERT_RELOADS, self.name, "ok").inc()
        logs.event("tls_reloaded", listener=self.name)
        return True


def failure_reason(e: BaseException) -> str:
    """A closed set of handshake-failure reasons for the metric label."""
    if isinstance(e, TimeoutError) or (
        isinstance(e, ConnectionAbortedError) and "longer" in str(e)
    ):
        return "timeout"  # asyncio's ssl_handshake_timeout aborts with that wording
    if isinstance(e, ssl.SSLError):
        r = (e.reason or "").upper()
        # Plaintext (an SMTP client on the implicit-TLS port) is a record OpenSSL
        # cannot read: "wrong version number", from the bytes where the version goes.
        if r in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            return "not_tls"
        if "VERSION" in r or "PROTOCOL" in r:
            return "protocol_version"
        if "CIPHER" in r:
            return "no_shared_cipher"
        if "CERTIFICATE" in r:
            return "certificate"
        if "ALERT" in r:
            return "client_alert"
        if "RECORD" in r or "PACKET" in r or "HTTP" in r:
            return "not_tls"
        return "other"
    return "eof"


def describe(obj: ssl.SSLObject | None) -> tuple[str | None, str | None]:
    """(version, cipher) of an established session, e.g. ('TLSv1.3', 'TLS_AES_256_GCM_SHA384')."""
    if obj is None:
        return None, None
    cipher = obj.cipher()
    return obj.version(), cipher[0] if cipher else None


def server_context(
    listener: config.Listener, index: int = 0, *, export: bool = True
) -> ListenerTls | None:
    """The listener's TLS (None without); `index`: its place in `listeners`, which
    errors name; `export`: whether its certificates' expiry is a metric of this
    process (not of one that only validates the config)."""
    if listener.tls is config.TlsMode.NONE:
        return None
    return ListenerTls(listener, index, export)
