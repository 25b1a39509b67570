"""The SMTP stages at which checks run, and the context they see."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from gateway.address import Address


class Stage(StrEnum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


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
    # transaction
    mail_from: Address | None = None
    rcpt: Address | None = None
    recipients: list[Address] = field(default_factory=list)
    message: bytes | None = None

    def new_transaction(self) -> None:
        self.mail_from = None
        self.rcpt = None
        self.recipients = []
        self.message = None
