"""Handing a report message to the relay: the backend MTA (its first smtp://
target), or a submission server (dmarc_reports.relay) with STARTTLS and AUTH PLAIN.

Our own SMTP client (forward/client.py) does the talking, with its timeouts and
reply checks. The relay, not the gateway, delivers to the destination and owns its
retries; what can fail here is the hand-over: a failure to reach the relay or a
4xx is temporary (the report is kept for the next run), a 5xx permanent.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gateway import config
from gateway.forward.backend import client_tls_context
from gateway.forward.client import BackendError, SmtpClient, SmtpReply
from gateway.wire import stuff


class SendFailed(Exception):
    def __init__(self, reason: str, detail: str, temporary: bool) -> None:
        super().__init__(detail)
        self.reason = reason  # refused or relay_error (a metric label)
        self.temporary = temporary


@dataclass(frozen=True)
class Relay:
    host: str
    port: int
    helo: str
    tls: config.BackendTls
    timeout: float
    tls_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        return f"smtp://{self.host}:{self.port}"


def relay_of(settings: config.Settings) -> Relay:
    """The relay the configuration names: dmarc_reports.relay.url, else the first
    smtp:// backend with the backend's TLS settings. Reads the password file."""
    rc = settings.dmarc_reports.relay
    ctx: ssl.SSLContext | None = None
    if rc.url is not None:
        url, tls, ca = rc.url, rc.tls, rc.ca_file
        timeout = rc.timeout
        if tls is not config.BackendTls.NONE:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if tls is config.BackendTls.OPPORTUNISTIC and ca is None:
                # As the backend hop: encryption against listeners, not authentication.
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
    else:
        # The backend hop exactly as the gateway's own mail takes it (its client
        # certificate and TLS minimum included): one context builder for it.
        url = next(u for u in settings.backend.url if u.startswith("smtp:"))
        tls = settings.backend.tls
        timeout = settings.backend.command_timeout
        ctx = client_tls_context(settings.backend)
    parts = urlsplit(url)
    password = None
    if rc.password_file is not None and rc.url is not None:
        password = Path(rc.password_file).read_text().strip()
    return Relay(
        host=parts.hostname or "",
        port=parts.port or 25,
        helo=settings.hostname,
        tls=tls,
        timeout=timeout,
        tls_context=ctx,
        username=rc.username if rc.url is not None else None,
        password=password,
    )


def _check(reply: SmtpReply, what: str) -> None:
    if not reply.ok:
        raise SendFailed(
            "refused" if reply.code >= 500 else "relay_error",
            f"relay refused {what}: {reply}",
            temporary=reply.code < 500,
        )


async def send(relay: Relay, sender: str, rcpt: str, message: bytes) -> str:
    """Hand one message over; the relay's final reply. Raises SendFailed."""
    try:
        client = await SmtpClient.connect(
            relay.host,
            relay.port,
            helo=relay.helo,
            connect_timeout=relay.timeout,
            command_timeout=relay.timeout,
            data_timeout=relay.timeout,
            tls=relay.tls_context,
            tls_required=relay.tls is config.BackendTls.REQUIRED,
        )
    except BackendError as e:
        raise SendFailed("relay_error", f"{relay}: {e}", temporary=True) from None
    try:
        if relay.username is not None:
            if not client.tls_active:
                raise SendFailed("relay_error", f"{relay}: no TLS for AUTH", temporary=True)
            token = base64.b64encode(
                f"\0{relay.username}\0{relay.password or ''}".encode()
            ).decode()
            _check(await client.command("auth", f"AUTH PLAIN {token}"), "AUTH")
        reply, _ = await client.mail(sender, [])
        _check(reply, "MAIL")
        _check(await client.rcpt(rcpt, []), "RCPT")
        [final] = await client.data(stuff(message))
        _check(final, "the message")
        await client.quit()
        return str(final)
    except BackendError as e:
        raise SendFailed("relay_error", f"{relay}: {e}", temporary=True) from None
    finally:
        client.close()
