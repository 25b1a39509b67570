"""A real Rspamd (Debian's `rspamd` package: /usr/bin/rspamd) on loopback for the
content-scanning tests, installed by .ci/run. A missing binary is an error, not a
skip: the scanner is a feature and its tests must run.

Everything lives in one temporary directory: the configuration, the log, the
database and run directories (`--var` is not needed: this configuration names its
own paths and includes none of /etc/rspamd, so a machine's local.d never changes a
verdict here, and the package's own service, running or not, is not touched).

The configuration is minimal on purpose: one normal worker (no controller, proxy
or fuzzy storage), only the stock Lua plugins named below (milter_headers for the
add/remove-header block a real deployment configures, rbl for one DNS list), no
Redis, no statistics, no maps fetched from the internet, a four-name TLD list
(the stock one costs ten seconds to compile at every start) and the DNS resolver
pointed at the tests' DNS server: Rspamd never queries anything but loopback.
It starts in about a second.

Verdicts are made deterministic by rules of our own (RULES below) keyed on a
marker in the Subject, scored against the action thresholds of ACTIONS:

    GWTEST-REJECT   -> reject            (score 100, threshold 50)
    GWTEST-SUBJECT  -> rewrite subject   (score 35, threshold 30; "[SPAM] %s")
    GWTEST-TAG      -> add header        (score 25, threshold 20)
    GWTEST-GREY     -> greylist          (score 12, threshold 10)
    GWTEST-SOFT     -> soft reject       (a pre-result, as the ratelimit module sets)
    GWTEST-MILTER   -> no action, with a milter block of our own (header changes,
                       some of them hostile: see MILTER_RULE)
    the client IP listed in the DNS zone `bl.gwtest.test` -> GW_RBL, score 25

and every scan records what Rspamd received (client IP, HELO, envelope sender and
recipients, queue id, user, TLS, Subject, size) as one JSON line in scans.jsonl,
from a prefilter, which runs for every message whatever its verdict. So a test
counts the scans Rspamd really made and reads the envelope it really saw.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.procs import free_port

# Action thresholds (Rspamd picks the strongest one the score reaches).
ACTIONS = {"reject": 50, "rewrite_subject": 30, "add_header": 20, "greylist": 10}
SUBJECT_PREFIX = "[SPAM]"
RBL_ZONE = "bl.gwtest.test"

# The milter block GWTEST-MILTER asks for: an allowed header, a multi-line value,
# a header outside the gateway's allowed names, a value trying to start a header of
# its own, an Authentication-Results in the gateway's name (authserv-id gw.test,
# tests.support.procs.base_config's hostname) and one in Rspamd's, removals.
MILTER_RULE = r"""
rspamd_config:register_symbol({
  name = 'GW_MILTER', score = 0.0, group = 'gwtest',
  callback = function(task)
    if not subject_has(task, 'GWTEST-MILTER') then return false end
    task:set_milter_reply({
      add_headers = {
        ['X-Gwtest-Added'] = 'yes',
        ['X-Gwtest-Lines'] = 'first line\r\n\tsecond line',
        ['Reply-To'] = 'attacker@evil.test',
        ['X-Gwtest-Inject'] = 'ok\r\nBcc: victim@example.test',
        ['Authentication-Results'] = {
          'gw.test; dmarc=pass header.from=forged.test',
          'rspamd.gwtest; spf=pass smtp.mailfrom=sender.test',
        },
      },
      remove_headers = {['X-Remove-Me'] = 0, ['Received'] = 0},
    })
    return true
  end
})
"""

_RULES = r"""
local ucl = require "ucl"
local SCANS = %(scans)s

function subject_has(task, marker)
  local s = task:get_header('Subject') or ''
  return s:find(marker, 1, true) ~= nil
end

local function text(v)
  if v == nil then return nil end
  return tostring(v)
end

rspamd_config:register_symbol({
  name = 'GW_ENVELOPE', type = 'prefilter', priority = 10, group = 'gwtest',
  callback = function(task)
    local from = task:get_from('smtp')
    local rcpts = {}
    for _, r in ipairs(task:get_recipients('smtp') or {}) do
      table.insert(rcpts, r.addr)
    end
    local ip = task:get_from_ip()
    local rec = {
      ip = ip and ip:is_valid() and ip:to_string() or nil,
      helo = task:get_helo(),
      hostname = task:get_hostname(),
      from = from and from[1] and from[1].addr or nil,
      rcpts = rcpts,
      qid = task:get_queue_id(),
      user = task:get_user(),
      tls_cipher = text(task:get_request_header('TLS-Cipher')),
      tls_version = text(task:get_request_header('TLS-Version')),
      pass = text(task:get_request_header('Pass')),
      subject = task:get_header('Subject'),
      size = task:get_size(),
    }
    local f = assert(io.open(SCANS, 'a'))
    f:write(ucl.to_format(rec, 'json-compact') .. '\n')
    f:close()
    if subject_has(task, 'GWTEST-SOFT') then
      task:set_pre_result('soft reject', 'Try again later (gwtest)', 'gwtest')
    end
  end
})

local markers = {
  {'GW_REJECT', 'GWTEST-REJECT', 100.0},
  {'GW_SUBJECT', 'GWTEST-SUBJECT', 35.0},
  {'GW_TAG', 'GWTEST-TAG', 25.0},
  {'GW_GREY', 'GWTEST-GREY', 12.0},
}
for _, m in ipairs(markers) do
  rspamd_config:register_symbol({
    name = m[1], score = m[3], group = 'gwtest',
    callback = function(task)
      if subject_has(task, m[2]) then return true, 'marker' end
      return false
    end
  })
end
"""
RULES = _RULES + MILTER_RULE

CONFIG = """
options {
  pidfile = "%(dir)s/run/rspamd.pid";
  filters = "";
  dns {
    nameserver = ["%(dns)s"];
    timeout = 1s;
    retransmits = 1;
    sockets = 4;
  }
  url_tld = "%(dir)s/tld.dat";
  hs_cache_dir = "%(dir)s/db";
  cache_file = "%(dir)s/db/symbols.cache";
  control_socket = "%(dir)s/run/rspamd.sock mode=0600";
  tempdir = "%(dir)s/run";
  local_addrs = [];
  task_timeout = 8s;
}
logging {
  type = "file";
  filename = "%(dir)s/log/rspamd.log";
  level = "info";
}
worker "normal" {
  bind_socket = "127.0.0.1:%(port)d";
  count = 1;
  mime = true;
}
actions {
  reject = %(reject)d;
  rewrite_subject = %(rewrite_subject)d;
  add_header = %(add_header)d;
  greylist = %(greylist)d;
  subject = "%(prefix)s %%s";
}
lua = "%(dir)s/rules.lua";
milter_headers {
  use = ["x-spamd-result", "x-spam-status", "remove-spam-flag"];
  skip_local = false;
  skip_authenticated = false;
}
rbl {
  rbls {
    gwtest {
      symbol = "GW_RBL";
      rbl = "%(zone)s";
      ipv4 = true;
      ipv6 = false;
      from = true;
      received = false;
      exclude_local = false;
      exclude_private_ips = false;
    }
  }
}
group "gwtest" {
  symbols {
    "GW_RBL" { score = 25.0; }
  }
}
modules {
  path = "${PLUGINSDIR}";
}
"""


class RspamdServer:
    """Rspamd in the foreground (`-f`), its configuration in `workdir`, the DNS
    resolver at `dns` (host:port)."""

    def __init__(self, workdir: Path, dns: str) -> None:
        binary = shutil.which("rspamd")
        if binary is None:
            raise RuntimeError("rspamd is not installed (apt-get install rspamd)")
        self.binary = binary
        self.dir = workdir
        self.port = free_port()
        for sub in ("run", "db", "log"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        (workdir / "tld.dat").write_text("test\nexample\ncom\norg\n")
        (workdir / "rules.lua").write_text(RULES % {"scans": json.dumps(str(self.scans_path))})
        self.config = workdir / "rspamd.conf"
        self.config.write_text(
            CONFIG
            % {
                "dir": workdir,
                "dns": dns,
                "port": self.port,
                "prefix": SUBJECT_PREFIX,
                "zone": RBL_ZONE,
                **ACTIONS,
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scans_path(self) -> Path:
        return self.dir / "scans.jsonl"

    @property
    def log_path(self) -> Path:
        return self.dir / "log" / "rspamd.log"

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait until the normal worker answers /ping (a real answer on the
        port, not a log line: the worker is forked after the main process logs)."""
        argv = [self.binary, "-f", "-c", str(self.config)]
        if os.geteuid() == 0:
            # Rspamd refuses to run its workers as root without -u/-g; the tests' own
            # directory is no place for the package's _rspamd user to write to.
            argv.insert(2, "-i")
        out = (self.dir / "rspamd.out").open("ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir)
        out.close()
        while True:
            if self.ping():
                self.startup_seconds = time.monotonic() - started
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() - started > timeout:
                self.stop()
                raise RuntimeError(f"rspamd did not answer /ping in {timeout}s:\n{self.output()}")
            time.sleep(0.05)  # the poll's interval: readiness is the answer itself

    def ping(self) -> bool:
        """Whether the normal worker answers GET /ping with pong."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        except OSError:
            return False
        return data.startswith(b"HTTP/1.") and b" 200 " in data[:20] and b"pong" in data

    def stop(self) -> None:
        """SIGTERM and wait: the main process stops its workers before it exits."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def scans(self) -> list[dict[str, Any]]:
        """What Rspamd received, one entry per scan it made (oldest first)."""
        if not self.scans_path.exists():
            return []
        return [json.loads(line) for line in self.scans_path.read_text().splitlines() if line]

    def connections(self) -> int:
        """Connections the normal worker accepted (its log: one line each)."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("accepted connection from")

    def output(self) -> str:
        parts = []
        for p in (self.dir / "rspamd.out", self.log_path):
            if p.exists():
                parts.append(p.read_text(errors="replace")[-4000:])
        return "\n".join(parts)
