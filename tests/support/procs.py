"""Real processes for integration tests: the gateway and an SMTP backend.

Readiness is an event, not a sleep: the backend prints READY, the gateway logs
a `ready` event; a reader thread collects the gateway's log lines so a test
can wait for (and assert on) a specific line.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now, and never one this process handed out before: the kernel may
    give the same ephemeral port to two binds in a row once the first is closed, and
    a config with the listener and the metrics endpoint on one port cannot start."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


class Backend:
    """tests/support/backend.py as a subprocess."""

    def __init__(self, spool: Path, *args: str) -> None:
        self.port = free_port()
        self.spool = spool
        self.proc = subprocess.Popen(
            [
                PY,
                str(ROOT / "tests/support/backend.py"),
                "--port",
                str(self.port),
                "--spool",
                str(spool),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"backend did not start: {line!r} {err}")

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def messages(self) -> list[dict[str, Any]]:
        out = []
        for f in sorted(self.spool.glob("msg-*.json")):
            rec = json.loads(f.read_text())
            rec["data"] = base64.b64decode(rec["data"])
            out.append(rec)
        return out

    def commands(self) -> list[str]:
        p = self.spool / "commands.log"
        return p.read_text().splitlines() if p.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        for s in (self.proc.stdout, self.proc.stderr):
            if s:
                s.close()


class Gateway:
    """`python -m gateway run --config FILE` as a subprocess."""

    def __init__(
        self,
        workdir: Path,
        cfg: dict[str, Any],
        *,
        env: dict[str, str] | None = None,
        policy: str | None = None,
        ready: bool = True,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        if policy is not None:
            ppath = workdir / "policy.yaml"
            ppath.write_text(policy)
            cfg = {**cfg, "policy": str(ppath)}
        self.cfg = cfg
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.lines: list[str] = []
        self._cond = threading.Condition()
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [PY, "-m", "gateway", "run", "--config", str(self.config_path)],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if ready:
            try:
                self.wait_log(lambda e: e.get("event") == "ready", timeout=20)
            except BaseException:
                self.stop()  # no process or pipe left behind by a start that failed
                raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def events(self) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    def wait_log(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    try:
                        ev = json.loads(line)
                    except json.JSONDecodeError:
                        ev = {"raw": line}
                    if pred(ev):
                        return ev  # type: ignore[no-any-return]
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("log line not seen; log was:\n" + "\n".join(self.lines))
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError("gateway exited; log was:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def port(self, index: int = 0) -> int:
        return int(self.cfg["listeners"][index]["port"])

    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg['metrics']['listen']}"

    def metric(self, prefix: str) -> float:
        """The sum of every sample of /metrics whose line starts with `prefix`."""
        import urllib.request

        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=5) as r:
            body = r.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix)
        )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def command(self, *args: str) -> str:
        """An operator's command on this gateway's config (`python -m gateway ARGS
        --config FILE`): what it printed; one that fails fails the test, with its
        stderr."""
        out = subprocess.run(
            [PY, "-m", "gateway", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


def check_command(
    workdir: Path, message: bytes, *args: str, **config: Any
) -> subprocess.CompletedProcess[str]:
    """`smtp-gateway check` on `message` as if sent by 192.0.2.10 (HELO client.test),
    `args` after those: its result, whatever its status. The config (gw.yaml in
    `workdir`, the message beside it) is the gateway mx.gw.test for example.test, no
    network trusted, `config` on top (a policy, the DNS to ask)."""
    cfg = workdir / "gw.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "hostname": "mx.gw.test",
                "trusted_networks": [],
                "local_domains": ["example.test"],
                **config,
            }
        )
    )
    eml = workdir / "m.eml"
    eml.write_bytes(message)
    return subprocess.run(
        [PY, "-m", "gateway", "check", str(eml), "--config", str(cfg),
         "--client-ip", "192.0.2.10", "--helo", "client.test", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def base_config(backend_url: str | list[str], **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "hostname": "gw.test",
        "listeners": [{"name": "smtp", "address": "127.0.0.1", "port": free_port()}],
        "local_domains": ["example.test", "*.corp.test", "localhost"],
        "backend": {
            "url": backend_url,
            "connect_timeout": 2,
            "command_timeout": 5,
            "data_timeout": 10,
        },
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "drain_timeout": 10,
        "workers": 1,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg
