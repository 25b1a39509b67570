"""A real DNS server on loopback (UDP and TCP) serving test zones.

Zones are a dict: name -> list of (type, value) with presentation-format
values ("v=spf1 -all", "10 mx.example.test.", "192.0.2.1"); a TXT value may
also be a tuple of byte strings (one per character-string). Special types
change behaviour for a name: ("SERVFAIL", ""), ("TIMEOUT", "") (never
answers, for types not listed before it), ("DELAY", "0.2") (answers after that
many seconds). A name that is absent is NXDOMAIN; a name present without the
asked type is NODATA. A CNAME is followed the way an authoritative BIND follows
it: the whole chain in one answer, loops included (stopping where a name
repeats), not one hop.
Every query is recorded, so tests can assert what was (not) asked.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

Zone = dict[str, list[tuple[str, Any]]]
MAX_CHAIN = 16  # CNAME links followed in one answer (BIND's own bound is similar)


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class DnsServer:
    def __init__(self, zone: Zone | None = None, ttl: int = 300) -> None:
        self.zone: Zone = {}
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        if zone:
            self.add(zone)
        handler = self._handler_classes()
        # UDP and TCP on one port number: a port free for UDP may be taken for TCP.
        for _attempt in range(50):
            self.udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), handler[0])
            self.port = self.udp.server_address[1]
            self.tcp = socketserver.ThreadingTCPServer(
                ("127.0.0.1", self.port), handler[1], bind_and_activate=False
            )
            self.tcp.allow_reuse_address = True
            try:
                self.tcp.server_bind()
                self.tcp.server_activate()
                break
            except OSError:
                self.tcp.server_close()
                self.udp.server_close()
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        for srv in (self.udp, self.tcp):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, zone: Zone) -> None:
        with self._lock:
            for name, records in zone.items():
                self.zone.setdefault(_norm(name), []).extend(records)

    def replace(self, zone: Zone) -> None:
        with self._lock:
            self.zone = {}
        self.add(zone)

    def set(self, name: str, records: list[tuple[str, Any]]) -> None:
        with self._lock:
            self.zone[_norm(name)] = list(records)

    def asked(self, name: str, rdtype: str | None = None) -> int:
        with self._lock:
            return sum(
                1 for n, t in self.queries if n == _norm(name) and (rdtype is None or t == rdtype)
            )

    def close(self) -> None:
        for srv in (self.udp, self.tcp):
            srv.shutdown()
            srv.server_close()

    # -- answering --------------------------------------------------------------
    def answer(self, wire: bytes) -> bytes | None:
        try:
            q = dns.message.from_wire(wire)
        except Exception:
            return None
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        if not q.question:
            r.set_rcode(dns.rcode.FORMERR)
            return r.to_wire()
        question = q.question[0]
        # Raw labels, not presentation form: test names may hold spaces or '%'.
        name = _norm(".".join(lbl.decode("latin-1") for lbl in question.name.labels if lbl))
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype))
            records = list(self.zone.get(name, [])) if name in self.zone else None
        if records is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
            r.authority.append(self._soa(name))
            return r.to_wire()
        special = {t: v for t, v in records if t in ("SERVFAIL", "DELAY")}
        if "DELAY" in special:
            time.sleep(float(special["DELAY"]))
        if "SERVFAIL" in special:
            r.set_rcode(dns.rcode.SERVFAIL)
            return r.to_wire()
        values, seen = [], False
        for t, v in records:
            if t == "TIMEOUT":
                if not seen:
                    return None  # no answer at all: the client times out
                break
            if t == rdtype:
                seen = True
                values.append(v)
        cnames = [v for t, v in records if t == "CNAME"]
        if values:
            r.answer.append(self._rrset(question.name, rdtype, values))
        elif cnames and rdtype != "CNAME":
            self._chase(r, question.name, cnames[0], rdtype)
        else:
            r.authority.append(self._soa(name))
        return r.to_wire()

    def _chase(self, r: dns.message.Message, owner: dns.name.Name, cname: str, rdtype: str) -> None:
        """A CNAME and the chain after it, as an authoritative BIND answers: every
        link it holds, up to MAX_CHAIN, stopping where a name repeats (a loop: the
        links so far, no error) or leaves the zones; then the target's records of
        the asked type, if it has them."""
        seen = {_norm(owner.to_text())}
        for _ in range(MAX_CHAIN):
            r.answer.append(self._rrset(owner, "CNAME", [cname]))
            target = _norm(cname)
            if target in seen:
                return  # a loop
            seen.add(target)
            with self._lock:
                held = list(self.zone.get(target, []))
            tvals = [v for t, v in held if t == rdtype]
            if tvals:
                r.answer.append(self._rrset(dns.name.from_text(target), rdtype, tvals))
                return
            nxt = [v for t, v in held if t == "CNAME"]
            if not nxt:
                return
            owner, cname = dns.name.from_text(target), nxt[0]

    def _rrset(self, name: dns.name.Name, rdtype: str, values: Iterable[Any]) -> dns.rrset.RRset:
        rrs = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))
        for v in values:
            if rdtype in ("TXT", "SPF") and isinstance(v, tuple):
                rd = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, rrs.rdtype, list(v))
                rrs.add(rd, self.ttl)
                continue
            if rdtype in ("TXT", "SPF") and not v.startswith('"'):
                # Split long strings into 255-octet chunks, quoted, as zone files do.
                chunks = [v[i : i + 255] for i in range(0, len(v), 255)] or [""]
                v = " ".join(
                    '"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks
                )
            rrs.add(dns.rdata.from_text(dns.rdataclass.IN, rrs.rdtype, v), self.ttl)
        return rrs

    def _soa(self, name: str) -> dns.rrset.RRset:
        zone_apex = dns.name.from_text(name.split(".", 1)[-1] if "." in name else name)
        rrs = dns.rrset.RRset(zone_apex, dns.rdataclass.IN, dns.rdatatype.SOA)
        rrs.add(
            dns.rdata.from_text(
                dns.rdataclass.IN,
                dns.rdatatype.SOA,
                "ns.test. hostmaster.test. 1 3600 600 86400 60",
            ),
            60,
        )
        return rrs

    def _handler_classes(self) -> tuple[type, type]:
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                out = server.answer(data)
                if out is not None:
                    sock.sendto(out, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(10)
                try:
                    while True:
                        head = conn.recv(2)
                        if len(head) < 2:
                            return
                        (n,) = struct.unpack("!H", head)
                        data = b""
                        while len(data) < n:
                            chunk = conn.recv(n - len(data))
                            if not chunk:
                                return
                            data += chunk
                        out = server.answer(data)
                        if out is None:
                            return
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    return

        return Udp, Tcp
