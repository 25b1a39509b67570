"""A real SMTP backend process for the tests (aiosmtpd), with failure modes.

Every accepted message is written to the spool as JSON (envelope, raw bytes,
XCLIENT/XFORWARD attributes, TLS) so tests can assert exactly what the
backend holds. Every command it sees is appended to `commands.log`.

Run: python tests/support/backend.py --port P --spool DIR [options]; prints
READY on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import ssl
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class Backend:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.spool = Path(args.spool)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.connections = 0
        self.open_now = 0  # connections open at this moment (--max-connections)
        self.cmdlog = open(self.spool / "commands.log", "a", buffering=1)  # noqa: SIM115

    def log(self, line: str) -> None:
        self.cmdlog.write(line + "\n")

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self.log(f"EHLO {hostname}")
        out = [r for r in responses if "AUTH" not in r]
        if self.args.no_8bitmime:  # the keyword only; aiosmtpd still takes BODY=
            out = [r for r in out if "8BITMIME" not in r]
        last = out[-1]
        out[-1] = last.replace("250 ", "250-", 1)
        extra = []
        if self.args.xclient and not getattr(session, "xclient", None):
            # As Postfix: XCLIENT is offered to the authorised client only, and after
            # it the client is the one named, who is not.
            extra.append("250-XCLIENT ADDR NAME PORT HELO PROTO")
        if self.args.xforward:
            extra.append("250-XFORWARD ADDR NAME PORT HELO PROTO")
        if self.args.pipelining:  # aiosmtpd reads pipelined commands, but does not say so
            extra.append("250-PIPELINING")
        if self.args.dsn:
            extra.append("250-DSN")
        if self.args.requiretls and server._tls_protocol is not None:
            extra.append("250-REQUIRETLS")  # RFC 8689: over TLS only
        out += extra
        out[-1] = out[-1].replace("250-", "250 ", 1)
        return out

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.log(f"MAIL {address} {' '.join(options)}")
        if address.lower() in self.args.reject_mail:
            return f"553 5.7.1 <{address}>: backend refuses this sender"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 backend sender ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.log(f"RCPT {address}")
        if address.lower() in self.args.reject_rcpt:
            return f"550 5.1.1 <{address}>: backend says user unknown"
        if address.lower() in self.args.tempfail_rcpt:
            return f"450 4.2.0 <{address}>: backend greylisted"
        if address.lower() in self.args.shutdown_rcpt:
            return "421 4.3.2 backend shutting down"
        envelope.rcpt_tos.append(address)
        return f"250 2.1.5 backend accepted <{address}>"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.log("RSET")
        return "250 2.0.0 backend reset"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.log("DATA")
        if self.args.drop_in_data:
            assert server.transport is not None
            server.transport.abort()
            return "451 4.0.0 never sent"
        if self.args.data_delay:
            await asyncio.sleep(self.args.data_delay)
        if self.args.data_reply:
            return str(self.args.data_reply)
        if self.args.lmtp:
            # LMTP: one reply per accepted recipient (RFC 2033 4.2).
            per, delivered = [], []
            for rcpt in envelope.rcpt_tos:
                if rcpt.lower() in self.args.lmtp_fail:
                    per.append(f"452 4.2.2 <{rcpt}> backend mailbox full")
                elif rcpt.lower() in self.args.lmtp_refuse:
                    per.append(f"552 5.2.2 <{rcpt}> backend mailbox over quota")
                else:
                    per.append(f"250 2.0.0 <{rcpt}> backend delivered")
                    delivered.append(rcpt)
            if any(p.startswith("4") for p in per):
                return "\r\n".join(per)
            if delivered:  # what a real LMTP server keeps: the accepted recipients' copies
                envelope.rcpt_tos = delivered
                self._store(session, envelope)
            return "\r\n".join(per)
        return self._store(session, envelope)

    def _store(self, session: Session, envelope: Envelope) -> str:
        self.count += 1
        xclient: dict[str, Any] = getattr(session, "xclient", {})
        record = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "data": base64.b64encode(envelope.original_content or b"").decode(),
            "xclient": xclient,
            "xforward": getattr(session, "xforward", {}),
            "tls": session.ssl is not None,
            "requiretls": getattr(session, "requiretls", False),
            "dsn_mail": getattr(envelope, "dsn_mail", []),
            "dsn_rcpt": getattr(envelope, "dsn_rcpt", {}),
            "peer": list(session.peer) if session.peer else None,
            "helo": session.host_name,
            "session": id(session),
        }
        tmp = self.spool / f".msg-{self.count}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.rename(self.spool / f"msg-{self.count:05d}.json")
        return f"250 2.0.0 backend queued as B{self.count}"


_DSN_KEYS = ("RET=", "ENVID=", "NOTIFY=", "ORCPT=")


def _take_dsn(arg: str) -> tuple[str, list[str]]:
    """The command argument without its DSN parameters, and those as written."""
    words = arg.split()
    found = [w for w in words[1:] if w.upper().startswith(_DSN_KEYS)]
    return " ".join(w for w in words if w not in found), found


class BackendSMTP(SMTP):
    """aiosmtpd refuses parameters it does not know (555), and upper-cases those it
    keeps: REQUIRETLS and, with --dsn, the DSN parameters are recorded here as sent."""

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and self.event_handler.args.requiretls and self._tls_protocol is not None:
            words = arg.split()
            found = any(w.upper() == "REQUIRETLS" for w in words)
            self.session.requiretls = found  # type: ignore[attr-defined]
            arg = " ".join(w for w in words if w.upper() != "REQUIRETLS")
        if arg and self.event_handler.args.dsn:
            arg, found = _take_dsn(arg)
            self.envelope.dsn_mail = found  # type: ignore[attr-defined]
            self.envelope.dsn_rcpt = {}  # type: ignore[attr-defined]
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg and self.event_handler.args.dsn:
            arg, found = _take_dsn(arg)
            if found:
                self.event_handler.log(f"RCPT-DSN {arg} {' '.join(found)}")
                rcpts = getattr(self.envelope, "dsn_rcpt", {})
                rcpts[arg.split()[0][3:].strip("<>")] = found
                self.envelope.dsn_rcpt = rcpts  # type: ignore[attr-defined]
        await super().smtp_RCPT(arg)

    async def smtp_XCLIENT(self, arg: str) -> None:
        if self.event_handler.args.refuse_xclient:
            self.event_handler.log(f"XCLIENT-REFUSED {arg}")
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if getattr(self.session, "xclient", None):
            self.event_handler.log(f"XCLIENT-AGAIN {arg}")
            await self.push("554 5.7.0 Error: insufficient authorization")
            return
        attrs = dict(p.split("=", 1) for p in arg.split())
        if any(not v or len(v.encode()) > 255 for v in attrs.values()):  # as Postfix
            self.event_handler.log(f"XCLIENT-TOO-LONG {arg[:60]}")
            await self.push("501 5.5.4 Error: attribute value too long")
            return
        self.session.xclient = attrs  # type: ignore[attr-defined]
        self.event_handler.log(f"XCLIENT {arg}")
        await self.push("220 backend XCLIENT ok")

    async def smtp_XFORWARD(self, arg: str) -> None:
        attrs = dict(p.split("=", 1) for p in arg.split())
        if any(not v or len(v.encode()) > 255 for v in attrs.values()):  # as Postfix
            self.event_handler.log(f"XFORWARD-TOO-LONG {arg[:60]}")
            await self.push("501 5.5.4 Error: attribute value too long")
            return
        self.session.xforward = attrs  # type: ignore[attr-defined]
        self.event_handler.log(f"XFORWARD {arg}")
        await self.push("250 2.0.0 backend XFORWARD ok")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        h = self.event_handler
        h.connections += 1
        h.open_now += 1
        h.log(f"CONNECT {h.connections} OPEN {h.open_now}")
        self.busy = h.args.max_connections is not None and h.open_now > h.args.max_connections
        if self.busy:  # as Exim or Exchange at their connection limit
            h.log("BUSY")
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.3.2 backend.test Too many connections, try again later\r\n")
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.event_handler.open_now -= 1
        if not self.busy:
            super().connection_lost(exc)


class BackendLMTP(BackendSMTP):
    """LHLO instead of EHLO; otherwise the same recording backend."""

    async def smtp_LHLO(self, arg: str) -> None:
        await self.smtp_EHLO(arg)

    async def smtp_EHLO(self, arg: str) -> None:
        await super().smtp_EHLO(arg)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--reject-mail", action="append", default=[])
    p.add_argument("--reject-rcpt", action="append", default=[])
    p.add_argument("--pipelining", action="store_true", help="offer PIPELINING")
    p.add_argument("--dsn", action="store_true", help="offer DSN (RFC 3461)")
    p.add_argument("--tempfail-rcpt", action="append", default=[])
    p.add_argument("--data-reply")
    p.add_argument("--data-delay", type=float, default=0.0)
    p.add_argument("--drop-in-data", action="store_true")
    p.add_argument("--xclient", action="store_true")
    p.add_argument("--xforward", action="store_true")
    p.add_argument("--refuse-xclient", action="store_true")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--lmtp", action="store_true")
    p.add_argument("--requiretls", action="store_true")
    p.add_argument("--lmtp-fail", action="append", default=[])  # 452 at end of DATA
    p.add_argument("--lmtp-refuse", action="append", default=[])  # 552 at end of DATA
    p.add_argument("--shutdown-rcpt", action="append", default=[])  # 421 to this RCPT
    p.add_argument("--lenient", action="store_true", help="raw lenient DATA (smuggling tests)")
    p.add_argument("--extra-reply-after", help="lenient: one unrequested reply after VERB or .")
    p.add_argument("--refuse-early", action="store_true", help="lenient: 552 mid-DATA, close")
    p.add_argument("--no-smtputf8", action="store_true", help="offer no SMTPUTF8 (refuse it)")
    p.add_argument("--no-8bitmime", action="store_true", help="do not offer 8BITMIME")
    p.add_argument("--size-limit", type=int, default=64 * 1024 * 1024, help="advertised SIZE")
    p.add_argument("--max-connections", type=int, help="beyond: 421 greeting, close")
    args = p.parse_args()
    if args.lenient:
        from lenient import serve  # tests/support/lenient.py, next to this file

        await serve(args.port, Path(args.spool), args.extra_reply_after, args.refuse_early)
        return
    args.reject_mail = [a.lower() for a in args.reject_mail]
    args.reject_rcpt = [a.lower() for a in args.reject_rcpt]
    args.tempfail_rcpt = [a.lower() for a in args.tempfail_rcpt]
    args.shutdown_rcpt = [a.lower() for a in args.shutdown_rcpt]
    args.lmtp_fail = [a.lower() for a in args.lmtp_fail]
    args.lmtp_refuse = [a.lower() for a in args.lmtp_refuse]
    handler = Backend(args)
    server_cls = BackendLMTP if args.lmtp else BackendSMTP
    tls_ctx = None
    if args.tls_cert:
        tls_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_ctx.load_cert_chain(args.tls_cert, args.tls_key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: server_cls(
            handler,
            hostname="backend.test",
            tls_context=tls_ctx,
            enable_SMTPUTF8=not args.no_smtputf8,
            data_size_limit=args.size_limit,
        ),
        "127.0.0.1",
        args.port,
    )
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
