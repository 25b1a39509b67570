"""A real redis-server on loopback for the shared-limit tests (installed by .ci/run).

A missing binary is an error, not a skip: the shared store is a feature and its
tests must run.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

from tests.support.procs import free_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", "",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:
            seen.append(line)
            if "Ready to accept connections" in line:
                # Keep reading so a chatty server never blocks on a full pipe.
                self._drainer = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
                self._drainer.start()
                return
        raise RuntimeError("redis-server did not start:\n" + "".join(seen))

    @staticmethod
    def _drain(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for _ in proc.stdout:
            pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self._drainer.join(5)  # it ends at EOF, once the server has exited
            self.proc.stdout.close()
        self.proc = None
