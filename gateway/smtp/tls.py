"""Server-side TLS contexts for listeners, built once and shared by sessions."""

from __future__ import annotations

import ssl

from gateway import config


class TlsConfigError(config.ConfigError):
    pass


def server_context(listener: config.Listener) -> ssl.SSLContext | None:
    if listener.tls is config.TlsMode.NONE:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(listener.cert_file), str(listener.key_file))
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(
            f"listeners.{listener.name}.cert_file: cannot load certificate/key: {e}"
        ) from None
    return ctx


def describe(obj: ssl.SSLObject | None) -> tuple[str | None, str | None]:
    """(version, cipher) of an established session, e.g. ('TLSv1.3', 'TLS_AES_256_GCM_SHA384')."""
    if obj is None:
        return None, None
    cipher = obj.cipher()
    return obj.version(), cipher[0] if cipher else None
