"""One transaction's state, from MAIL to its end, in one object.

The session makes a new one at MAIL and another when the transaction ends
(`Session.end_txn`), the only two places; nothing of one transaction can leak
into the next (a stale backend sender in the next one's log line, say). The
facts the checks see live in the check context (`gateway.context`), reset at the
same two points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.address import Address
from gateway.forward.backend import ClientInfo
from gateway.forward.backend import Transaction as BackendTransaction
from gateway.pipeline.runner import View
from gateway.replies import Reply


@dataclass(slots=True)
class Transaction:
    started: float = 0.0  # time.monotonic() at MAIL
    # The policy and check slots taken at MAIL (runner.View): every stage, rewrite and
    # header of this transaction follows it, even if a reload comes in between.
    view: View | None = None
    # The backend's side, once it took MAIL; None before, and after it was given up.
    backend: BackendTransaction | None = None
    # Set when the backend transaction was lost or could not be reopened: every later
    # command of this transaction gets it (the client was told 250 for recipients
    # the backend no longer holds; only a retry of the whole transaction is safe).
    broken: Reply | None = None
    utf8: bool = False  # MAIL ... SMTPUTF8
    client: ClientInfo | None = None  # who the backend was told the client is
    mail_params: list[str] = field(default_factory=list)  # MAIL's, as the backend got them
    # MAIL FROM as the backend got it (rewritten, SRS); None until the backend saw it.
    backend_sender: Address | None = None
    # The DSN parameters of the recipients that had some, by backend address.
    rcpt_params: dict[Address, list[str]] = field(default_factory=dict)
    rcpt_tried: int = 0  # RCPT commands that reached the checks
    # The backend's refusals of this transaction's recipients, for its log line.
    rcpt_refused: list[str] = field(default_factory=list)
