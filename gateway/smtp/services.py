"""What every session of a process shares (Services), each listener's run-time
state, and the words a session is known by: its id and its EHLO capabilities."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway import config
from gateway.address import Address
from gateway.forward.backend import Backend
from gateway.pipeline.runner import Runner
from gateway.smtp import tls
from gateway.smtp.guard import FailureLimit
from gateway.smtp.memory import MessageMemory

if TYPE_CHECKING:
    from gateway.dmarcreports.record import Recorder
    from gateway.smtp.session import Session

_ID_PREFIX = os.urandom(3).hex()
_id_counter = itertools.count(1)


def new_session_id() -> str:
    """Unique across restarts and workers (random per-process prefix) without a
    getrandom() system call per connection."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFF:06x}"


def reseed_session_ids() -> None:
    """After fork: each worker gets its own prefix."""
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(3).hex()


@dataclass
class ListenerState:
    """One configured listener at run time: its TLS context and live count."""

    cfg: config.Listener
    tls: tls.ListenerTls | None
    active: int = 0
    server: asyncio.AbstractServer | None = None
    ehlo_plain: bytes = b""
    ehlo_tls: bytes = b""
    # REQUIRETLS can be honoured: the backend hop is TLS with a verified certificate.
    requiretls: bool = False


@dataclass
class Services:
    """What every session shares; owned and swapped by the app."""

    settings: config.Settings
    runner: Runner
    backend: Backend
    is_trusted: Callable[[str], bool]
    is_proxy: Callable[[str], bool]
    # A recipient in local_domains without routing tricks (relay control's rule).
    is_local: Callable[[Address], bool]
    memory: MessageMemory  # message data in this process (limits.max_data_memory)
    # Invalid SRS addresses per client (smtp/guard.py).
    srs_failures: FailureLimit = field(default_factory=FailureLimit)
    # The largest message taken: limits.max_message_size, or the backend's SIZE when
    # that is smaller (advertised, and refused at MAIL and in DATA with 552).
    max_size: int = 0
    draining: bool = False
    sessions: set[Session] = field(default_factory=set)
    # DMARC evaluations for aggregate reports (dmarc_reports.enabled), else None.
    dmarc: Recorder | None = None


def ehlo_lines(
    settings: config.Settings, listener: config.Listener, tls_active: bool, max_size: int
) -> bytes:
    """The capability lines after the greeting line; computed once per listener, and
    again when the backend's SIZE changes what `max_size` is (Services.max_size)."""
    caps = [
        "PIPELINING",
        f"SIZE {max_size}",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "ENHANCEDSTATUSCODES",
    ]
    if listener.tls is config.TlsMode.STARTTLS and not tls_active:
        caps.append("STARTTLS")
    if tls_active and requiretls_possible(settings):
        caps.append("REQUIRETLS")
    return b"".join(
        f"250{' ' if i == len(caps) - 1 else '-'}{c}\r\n".encode() for i, c in enumerate(caps)
    )


def requiretls_possible(settings: config.Settings) -> bool:
    """RFC 8689: only promise REQUIRETLS if the next hop is TLS with verification."""
    return settings.backend.tls is config.BackendTls.REQUIRED and not any(
        u.startswith("maildir:") for u in settings.backend.url
    )
