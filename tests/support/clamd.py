"""A real clamd (Debian's clamav-daemon, installed by .ci/run) for the virus-scanning
tests, with a signature database the test writes itself: nothing downloaded,
no freshclam, nothing outside its temporary directory.

The signatures (clamd appends `.UNOFFICIAL` to names outside its official
databases):
- `Gateway.Test.Marker`: a body signature (.ndb) for MARKER, anywhere in the stream;
- `Eicar-Test-Signature`: the EICAR test string (.ndb), built in code;
- `Gateway.Test.Attachment`: the MD5 of ATTACHMENT (.hdb), a generated binary
  that matches only once clamd has decoded it out of a MIME part.

A missing binary is an error, not a skip: virus scanning is a feature and its
tests must run. Readiness is clamd answering PING with PONG, not a sleep.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path

from tests.support.procs import free_port

CLAMD = "/usr/sbin/clamd"

MARKER = (
    b"SMTP-GATEWAY-TEST-VIRUS-" + hashlib.sha256(b"smtp-gateway marker").hexdigest()[:16].encode()
)
# The EICAR anti-virus test file (eicar.org), in pieces so this source file is no
# test virus itself to the scanners of whoever checks it out.
EICAR = b"".join(
    (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$", b"EICAR-STANDARD-ANTIVIRUS-", b"TEST-FILE!$H+H*")
)
ATTACHMENT = hashlib.sha256(b"attachment").digest() * 64  # 2 KiB, binary

SIGNATURES = {
    "marker": "Gateway.Test.Marker.UNOFFICIAL",
    "eicar": "Eicar-Test-Signature.UNOFFICIAL",
    "attachment": "Gateway.Test.Attachment.UNOFFICIAL",
}

_RESULT = re.compile(r"^(?:.* -> )?instream\([^)]*\): (OK|.+ FOUND)$")


class Clamd:
    """clamd in the foreground on a Unix socket and a loopback TCP port."""

    def __init__(self, workdir: Path, *, stream_max: int = 1024 * 1024) -> None:
        if not os.path.exists(CLAMD):
            raise RuntimeError(f"{CLAMD} is not installed (apt-get install clamav-daemon)")
        self.workdir = workdir
        self.port = free_port()
        self.socket = str(workdir / "clamd.sock")
        self.stream_max = stream_max
        self.log = workdir / "clamd.log"
        db = workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        (workdir / "tmp").mkdir(exist_ok=True)
        (db / "test.ndb").write_text(
            f"Gateway.Test.Marker:0:*:{MARKER.hex()}\nEicar-Test-Signature:0:*:{EICAR.hex()}\n"
        )
        (db / "test.hdb").write_text(
            f"{hashlib.md5(ATTACHMENT).hexdigest()}:{len(ATTACHMENT)}:Gateway.Test.Attachment\n"
        )
        self.conf = workdir / "clamd.conf"
        # Running as root (the CI container): no User, so clamd keeps its uid and
        # reads the database and socket directory it was given.
        self.conf.write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"LocalSocket {self.socket}",
                    "FixStaleSocket yes",
                    f"TCPSocket {self.port}",
                    "TCPAddr 127.0.0.1",
                    f"DatabaseDirectory {db}",
                    f"TemporaryDirectory {workdir / 'tmp'}",
                    f"PidFile {workdir / 'clamd.pid'}",
                    f"LogFile {self.log}",
                    "LogClean yes",  # every scan's result in the log: the tests count them
                    f"StreamMaxLength {stream_max}",
                    "SelfCheck 0",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def tcp(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def unix(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [CLAMD, "--foreground", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not self.ping():
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"clamd exited with {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("clamd did not answer PING within 60 s")
            time.sleep(0.05)  # polling the socket until it answers: no event to wait on
        # The TCP socket is bound before the Unix one in clamd's start-up, but ask it too.
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"zPING\0")
            assert s.recv(16) == b"PONG\0"

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(self.socket)
                s.sendall(b"zPING\0")
                return s.recv(16) == b"PONG\0"
        except OSError:
            return False

    def results(self) -> list[str]:
        """Every INSTREAM result clamd logged, in order: "OK" or "<name> FOUND"."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = _RESULT.search(line)
            if m:
                out.append(m.group(1))
        return out

    def wait_results(self, n: int, timeout: float = 10) -> list[str]:
        """The results once clamd has logged at least `n` (it may log a result a
        moment after it answered)."""
        deadline = time.monotonic() + timeout
        while len(got := self.results()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"clamd logged {len(got)} results, not {n}: {got}")
            time.sleep(0.02)  # polling clamd's log file: it has no other signal
        return got

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None
