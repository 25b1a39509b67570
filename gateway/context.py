"""The context checks see at each stage (the stages themselves: gateway.vocab)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.address import Address
from gateway.facts import Facts
from gateway.vocab import AuthResult
from gateway.wire import unstuff


@dataclass(slots=True)
class Context:
    """What a check may know. Filled by the SMTP front end, read by checks.

    Session fields stay for the connection; transaction fields are reset by
    `new_transaction` (after RSET, a completed DATA, or a new MAIL).
    """

    session_id: str
    client_ip: str
    client_port: int
    listener: str
    trusted: bool = False
    helo: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    # Session-level reputation: DNSBL score and hits, allowlisting, reply details.
    dnsbl_score: float = 0.0
    dnsbl_hits: list[str] = field(default_factory=list)
    allowlisted: bool = False
    details: dict[str, str] = field(default_factory=dict)
    # Called once when the connection ends, however it ends (frees concurrency slots).
    on_close: list[Callable[[], None]] = field(default_factory=list)
    # transaction
    mail_from: Address | None = None
    rcpt: Address | None = None
    recipients: list[Address] = field(default_factory=list)  # as the backend has them
    # Recipients that rewriting changed: (as the client gave it, what the backend got).
    rewritten: list[tuple[Address, tuple[Address, ...]]] = field(default_factory=list)
    # The message as received: dot-stuffed, CRLF lines (see smtp/data.py).
    wire: bytes | None = None
    _message: bytes | None = None
    # What the authentication checks found: their Authentication-Results entries,
    # and their typed findings (DMARC reads SPF's, DKIM's and ARC's).
    auth: list[AuthResult] = field(default_factory=list)
    facts: Facts = field(default_factory=Facts)
    # Symbols whose action was tag or quarantine, at any stage of the transaction.
    tags: list[str] = field(default_factory=list)
    quarantine: bool = False
    # When the running check's time is up (event-loop time), set by the runner
    # before each check: the one clock a check reads for its own lookups (none
    # for a check called without a runner).
    deadline: float = math.inf

    def new_transaction(self) -> None:
        self.mail_from = None
        self.rcpt = None
        self.recipients = []
        self.rewritten = []
        self.wire = None
        self._message = None
        self.auth = []
        self.facts = Facts()
        self.tags = []
        self.quarantine = False

    def unstuffed(self, content: bytes) -> None:
        """The message content, unstuffed already (a large one, in a thread)."""
        self._message = content

    @property
    def message(self) -> bytes | None:
        """The message content (unstuffed), computed once and only if a check asks."""
        if self._message is None and self.wire is not None:
            self._message = unstuff(self.wire)
        return self._message
