"""Real mail servers for interop tests: Postfix, Dovecot LMTP and Exim.

Each instance is self-contained: its own configuration, queue/spool, state,
mailboxes and log file in a fresh directory, listening on 127.0.0.1 only, on a
free port. Nothing system-wide is read or started (no /etc/postfix/main.cf,
no /etc/dovecot/conf.d, no /etc/exim4, no syslog, no init system).

The instance directory is made with ``tempfile.mkdtemp`` under /tmp and opened
to 0755, not under pytest's ``tmp_path``: that one sits below a 0700
directory, and the servers' unprivileged users (postfix, the mailbox owner,
Exim's user) must traverse every directory on the way to their queue and
mailboxes. The ``workdir`` argument (a pytest tmp dir) gets a symlink to the
instance directory while it lives, and a copy of the server's log when the
instance is closed, so a failed test can still be read after the fact.

Readiness is an event: ``start()`` returns once the port accepts a connection
and the server's 220 greeting has arrived. ``stop()`` stops the server the
documented way and waits until every process of the instance is gone (and the
port is closed); one left behind is killed and reported as an error.

A missing binary raises ``MtaUnavailable`` (a RuntimeError): a test that needs
the server fails with the message, it is never skipped.

Use as context managers or module-scoped fixtures::

    @pytest.fixture(scope="module")
    def postfix(tmp_path_factory):
        with Postfix(tmp_path_factory.mktemp("postfix")) as pf:
            yield pf
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.closing import Closing
from tests.support.procs import free_port

EXIM_DEFAULT = "/opt/smtp-gateway-test/exim/usr/sbin/exim4"

# The mailbox owner of every server here: exists on every Debian system.
MAILBOX_USER = "nobody"


class MtaUnavailable(RuntimeError):
    """The server's binary (or a system user it needs) is not installed."""


def _require(path: str | None, what: str, hint: str) -> str:
    if path is None or not os.access(path, os.X_OK):
        raise MtaUnavailable(f"{what} is not installed ({path or 'not on PATH'}): {hint}")
    return path


def _which(name: str, *extra_dirs: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([*extra_dirs, os.environ.get("PATH", "")]))


def _user(name: str, hint: str = "") -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise MtaUnavailable(f"system user {name!r} does not exist{hint}") from None


def _proc_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _processes_marked(marker: str) -> list[int]:
    """Live pids whose command line or environment mentions `marker` (the
    instance directory: the servers' processes carry it in one or the other)."""
    out = []
    needle = marker.encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            blob = (d / "cmdline").read_bytes() + b"\0" + (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in blob and _proc_alive(int(d.name)):
            out.append(int(d.name))
    return out


def _grp_name(gid: int) -> str:
    return grp.getgrgid(gid).gr_name


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# The keeper: every server runs under one of these. It makes itself a child
# subreaper, so daemonized processes (Postfix's master, Exim's delivery
# processes) are reparented to it rather than to PID 1, which in a container
# may never reap them (they would stay as zombies). It runs the command, says
# "spawned PID" and "exited PID STATUS" on stdout, reaps everything below it,
# and exits once nothing is left: its exit is "the instance is gone". If its
# stdin closes first (the test process died, or stop() gave up) it kills
# everything below it.
_KEEPER = r"""
import ctypes, os, signal, subprocess, sys, threading, time
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
report = os.dup(1)
console = open(sys.argv[1], "ab")
child = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=console, stderr=console)

def say(line):
    try:
        os.write(report, line.encode() + b"\n")
    except OSError:  # the test process is gone: go on reaping
        pass

say(f"spawned {child.pid}")

def below():
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    mine, todo = [], [os.getpid()]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        mine += kids
        todo += kids
    return mine

def guard():
    sys.stdin.read()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in below():
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)

threading.Thread(target=guard, daemon=True).start()
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child.pid:
        say(f"exited {pid} {os.waitstatus_to_exitcode(status)}")
"""


class _Keeper:
    """A server command under the keeper above."""

    def __init__(self, cmd: Sequence[str], console: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _KEEPER, str(console), *cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,  # a ^C to pytest must not reach the servers first
        )
        self._buf = b""
        words = self._read_line(30)
        if words[:1] != ["spawned"]:
            self.proc.wait(10)
            raise RuntimeError(f"could not run {list(cmd)}: {console.read_text()}")
        self.pid = int(words[1])
        self.exit_status: int | None = None

    def _read_line(self, timeout: float) -> list[str]:
        """The keeper's next report, split in words ([] at EOF)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no report from the server's keeper process")
            chunk = os.read(fd, 4096)
            if not chunk:
                return []
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().split()

    def wait_command(self, timeout: float) -> int:
        """Wait for the command itself to exit (e.g. `postfix start`); its exit status."""
        words = self._read_line(timeout)
        if words[:1] != ["exited"]:
            raise RuntimeError(f"keeper said {words!r}")
        self.exit_status = int(words[2])
        return self.exit_status

    def command_alive(self) -> bool:
        return self.exit_status is None and _proc_alive(self.pid)

    def wait(self, timeout: float) -> bool:
        """True once everything under the keeper is gone (the keeper exited)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._close_pipes()
        return True

    def kill_all(self) -> None:
        """Close the keeper's stdin: it kills everything below it, then exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                f.close()


def read_greeting(port: int, timeout: float = 5.0) -> str:
    """Connect, read the (possibly multi-line) greeting, QUIT; the greeting text."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rb")
        lines: list[str] = []
        while True:
            line = f.readline()
            if not line:
                raise ConnectionError(f"connection closed before greeting: {lines!r}")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        try:
            s.sendall(b"QUIT\r\n")
            f.readline()
        except OSError:
            pass
        return "\n".join(lines)


class _Server(Closing):
    """What the three servers share: the instance directory, the log file, the
    mailboxes (Maildir under `mail/<user>/Maildir`), start/stop bookkeeping."""

    name = "server"
    scheme = "smtp"

    def __init__(self, workdir: Path, users: Sequence[str], domain: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = tuple(users)
        self.domain = domain
        self.root = Path(tempfile.mkdtemp(prefix=f"mta-{self.name}-", dir="/tmp"))
        self.root.chmod(0o755)
        self.port = free_port()
        # workdir/NAME-instance -> the instance directory while it lives;
        # workdir/NAME.log, the log kept by close(). NAME-PORT when taken.
        self.label = self.name
        if any(self.workdir.glob(f"{self.name}[.-]*")):
            self.label = f"{self.name}-{self.port}"
        self._link = self.workdir / f"{self.label}-instance"
        self._link.symlink_to(self.root)
        self.mailbox_owner = _user(MAILBOX_USER)
        self._dir("log")
        self._keeper: _Keeper | None = None
        self.greeting = ""
        self._closed = False

    # -- paths ------------------------------------------------------------
    def _dir(self, rel: str, mode: int = 0o755, owner: pwd.struct_passwd | None = None) -> Path:
        p = self.root / rel
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(mode)
        if owner is not None:
            os.chown(p, owner.pw_uid, owner.pw_gid)
        return p

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user / "Maildir"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    # -- log --------------------------------------------------------------
    def log(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0, *, since: int = 0) -> str:
        """The first log line (from character offset `since`, e.g. an earlier
        ``len(srv.log())``) matching the regex `pattern`; polls until `timeout`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log()[since:].splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: no log line matching {pattern!r} in {timeout}s; log:\n"
                    + self.log()[since:][-6000:]
                )
            time.sleep(0.05)

    # -- mailboxes --------------------------------------------------------
    def message_files(self, user: str) -> list[Path]:
        md = self.maildir(user)
        files = [f for sub in ("new", "cur") if (md / sub).is_dir() for f in (md / sub).iterdir()]
        return sorted(files, key=lambda f: (f.stat().st_mtime_ns, f.name))

    def messages(self, user: str) -> list[bytes]:
        """Messages delivered to `user` (Maildir new/ and cur/), oldest first."""
        return [f.read_bytes() for f in self.message_files(user)]

    def wait_messages(self, user: str, n: int, timeout: float = 10.0) -> list[bytes]:
        """Poll until `user` has at least `n` messages; all of them."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(user)
            if len(msgs) >= n:
                return msgs
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: {user} has {len(msgs)} message(s), wanted {n}; log:\n"
                    + self.log()[-6000:]
                )
            time.sleep(0.05)

    # -- lifecycle --------------------------------------------------------
    def _command(self) -> list[str]:
        """What the keeper runs: the server in the foreground, or its start command."""
        raise NotImplementedError

    def _after_spawn(self, keeper: _Keeper) -> None:
        """Called once the command runs (Postfix: wait for `postfix start` to succeed)."""

    def _terminate(self, keeper: _Keeper) -> None:
        """Ask the server to stop, the way its documentation says."""
        if keeper.command_alive():
            os.kill(keeper.pid, signal.SIGTERM)

    @property
    def running(self) -> bool:
        return self._keeper is not None

    @property
    def console_path(self) -> Path:
        """Where the server's own stdout/stderr go (start-up errors before its log is open)."""
        return self.root / "log" / "console.log"

    def _diagnostics(self) -> str:
        console = (
            self.console_path.read_text(errors="replace") if self.console_path.exists() else ""
        )
        return f"console:\n{console[-3000:]}\nlog:\n{self.log()[-6000:]}"

    def _write_config(self) -> None:
        raise NotImplementedError

    def _first_start(self) -> None:
        try:
            self._write_config()
            self.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def start(self) -> None:
        """Start (again, on the same port); returns once the 220 greeting arrives."""
        if self._keeper is not None:
            return
        self._keeper = _Keeper(self._command(), self.console_path)
        try:
            self._after_spawn(self._keeper)
            self._wait_ready(self._keeper, 30.0)
        except BaseException:
            with contextlib.suppress(RuntimeError):
                self.stop()
            raise

    def _wait_ready(self, keeper: _Keeper, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if keeper.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited while starting\n{self._diagnostics()}")
            try:
                greeting = read_greeting(self.port, timeout=5)
            except OSError as e:
                last = e
                time.sleep(0.05)
                continue
            if not greeting.startswith("220"):
                raise RuntimeError(f"{self.name}: unexpected greeting {greeting!r}")
            self.greeting = greeting
            return
        raise TimeoutError(
            f"{self.name} did not greet on port {self.port} ({last})\n{self._diagnostics()}"
        )

    def stop(self) -> None:
        """Stop; returns once every process of the instance is gone and the port is closed.

        A process still there 20 s after the stop request is killed, and reported
        as a RuntimeError (so is a server that refused to stop).
        """
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        problems = []
        try:
            self._terminate(keeper)
        except Exception as e:
            problems.append(f"stop request failed: {e}")
        if not keeper.wait(20):
            problems.append("processes still running 20 s after the stop request (killed)")
            keeper.kill_all()
        stray = _processes_marked(str(self.root))
        for p in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if stray:
            problems.append(f"stray processes {stray} (killed)")
        deadline = time.monotonic() + 10
        while _port_open(self.port):
            if time.monotonic() >= deadline:
                problems.append(f"port {self.port} still accepts connections")
                break
            time.sleep(0.05)
        if problems:
            raise RuntimeError(f"{self.name}: " + "; ".join(problems) + "\n" + self._diagnostics())

    def close(self) -> None:
        """Stop, keep a copy of the log in `workdir`, remove the instance directory."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            if self.log_path.exists():
                shutil.copyfile(self.log_path, self.workdir / f"{self.label}.log")
            self._link.unlink(missing_ok=True)
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------
# Postfix


class Postfix(_Server):
    """A real Postfix: smtpd on 127.0.0.1:port, virtual(8) delivery to Maildir.

    `postfix -c DIR start`; the log is `maillog_file` written by postlogd. Known
    users are `user@domain`; anybody else gets Postfix's own 550 5.1.1 "User
    unknown in virtual mailbox table". Clients in `blocked_clients` are
    rejected by `check_client_access` (at RCPT: smtpd_delay_reject).
    `mynetworks` is 127.0.0.1/32 only. No DNS: no peer-name lookups, and mail
    for any other domain is refused by the error transport, never sent out.
    """

    name = "postfix"

    def __init__(
        self,
        workdir: Path,
        *,
        message_size_limit: int = 10_000_000,
        blocked_clients: Sequence[str] = ("127.0.0.3",),
        users: Sequence[str] = ("alice", "bob"),
        domain: str = "example.test",
        xclient_hosts: str = "127.0.0.1",
        xforward_hosts: str = "127.0.0.1",
        extra_main_cf: dict[str, str] | None = None,
    ) -> None:
        hint = "apt-get install postfix"
        self.postfix = _require(_which("postfix", "/usr/sbin"), "postfix", hint)
        self.postconf = _require(_which("postconf", "/usr/sbin"), "postconf", hint)
        self.postfix_user = _user("postfix")
        super().__init__(workdir, users, domain)
        self.message_size_limit = message_size_limit
        self.blocked_clients = tuple(blocked_clients)
        self.xclient_hosts = xclient_hosts
        self.xforward_hosts = xforward_hosts
        self.extra_main_cf = dict(extra_main_cf or {})
        self.config_dir = self._dir("etc")
        self._first_start()

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "postfix.log"

    def _write_config(self) -> None:
        etc, root = self.config_dir, self.root
        self._dir("log")
        self._dir("data", 0o700, self.postfix_user)
        self._dir("spool")
        self._dir("mail", 0o755, self.mailbox_owner)
        (etc / "client_access").write_text(
            "".join(f"{addr} REJECT\n" for addr in self.blocked_clients)
        )
        (etc / "vmailbox").write_text(
            "".join(f"{u}@{self.domain} {u}/Maildir/\n" for u in self.users)
        )
        main = {
            "compatibility_level": "3.6",
            "queue_directory": f"{root}/spool",
            "data_directory": f"{root}/data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(root),
            "myhostname": f"postfix.{self.domain}",
            "mydomain": self.domain,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_banner": "$myhostname ESMTP Postfix",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "default_transport": "error:outbound mail is disabled in this test instance",
            "relay_transport": "error:outbound mail is disabled in this test instance",
            "smtpd_client_restrictions": f"check_client_access texthash:{etc}/client_access",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_authorized_xclient_hosts": self.xclient_hosts,
            "smtpd_authorized_xforward_hosts": self.xforward_hosts,
            "message_size_limit": str(self.message_size_limit),
            "virtual_mailbox_limit": "0",
            "smtputf8_enable": "yes",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": f"{root}/mail",
            "virtual_mailbox_maps": f"texthash:{etc}/vmailbox",
            "virtual_uid_maps": f"static:{self.mailbox_owner.pw_uid}",
            "virtual_gid_maps": f"static:{self.mailbox_owner.pw_gid}",
            "virtual_minimum_uid": "1",
            "smtpd_error_sleep_time": "0s",
            "in_flow_delay": "0s",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            **self.extra_main_cf,
        }
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        # Every service unchrooted; smtpd on our port only; postlogd for maillog_file.
        services = [
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "virtual unix - n n - - virtual",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        (etc / "master.cf").write_text("\n".join(services) + "\n")

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.postfix, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def _command(self) -> list[str]:
        # `start` creates the missing queue directories itself (post-install
        # create-missing) with the right owners and modes, and returns once the
        # master daemon has initialized (master -w): the listener is bound.
        return [self.postfix, "-c", str(self.config_dir), "start"]

    def _after_spawn(self, keeper: _Keeper) -> None:
        status = keeper.wait_command(60)
        if status != 0:
            raise RuntimeError(f"postfix start exited with {status}\n{self._diagnostics()}")

    def _terminate(self, keeper: _Keeper) -> None:
        r = self._ctl("stop")
        if r.returncode != 0:
            raise RuntimeError(f"postfix stop exited with {r.returncode}: {r.stdout}{r.stderr}")

    def postconf_value(self, name: str) -> str:
        """A parameter of this instance as Postfix sees it (`postconf -c DIR -h`)."""
        r = subprocess.run(
            [self.postconf, "-c", str(self.config_dir), "-h", name],
            capture_output=True,
            text=True,
            check=True,
        )
        return r.stdout.strip()


# ---------------------------------------------------------------------------
# Dovecot LMTP


class DovecotLmtp(_Server):
    """A real Dovecot serving only LMTP on 127.0.0.1:port (`dovecot -F -c CONF`).

    A complete configuration of its own (nothing from /etc/dovecot): users from
    a passwd-file, Maildir under the instance directory, the quota plugin with
    a 1-byte storage limit for `full_users`, so a delivery to them is refused
    with Dovecot's own over-quota reply (552 5.2.2, or 452 4.2.2 with
    `quota_full_tempfail`) while the others are delivered. An unknown user gets
    Dovecot's own 550 5.1.1.
    """

    name = "dovecot"
    scheme = "lmtp"

    def __init__(
        self,
        workdir: Path,
        *,
        users: Sequence[str] = ("alice", "bob", "full"),
        domain: str = "example.test",
        full_users: Sequence[str] = ("full",),
        quota_full_tempfail: bool = False,
    ) -> None:
        hint = "apt-get install dovecot-core dovecot-lmtpd"
        self.dovecot = _require(_which("dovecot", "/usr/sbin"), "dovecot", hint)
        lmtp = "/usr/lib/dovecot/lmtp"
        _require(lmtp if os.path.exists(lmtp) else None, "dovecot's lmtp", hint)
        for u in ("dovecot", "dovenull"):
            _user(u)
        super().__init__(workdir, users, domain)
        self.full_users = tuple(full_users)
        self.quota_full_tempfail = quota_full_tempfail
        self.config_path = self.root / "etc" / "dovecot.conf"
        self._first_start()

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "dovecot.log"

    def _write_config(self) -> None:
        root, owner = self.root, self.mailbox_owner
        self._dir("etc")
        self._dir("run")
        self._dir("state")
        self._dir("mail", 0o755, owner)
        users = []
        for u in self.users:
            quota = "userdb_quota_rule=*:storage=1B" if u in self.full_users else ""
            users.append(
                f"{u}@{self.domain}::{owner.pw_uid}:{owner.pw_gid}::{root}/mail/{u}::{quota}\n"
            )
        (root / "etc" / "users").write_text("".join(users))
        conf = f"""\
# Complete configuration of a test instance: no !include of /etc/dovecot.
instance_name = dovecot-test-{self.port}
hostname = lmtp.{self.domain}
base_dir = {root}/run
state_dir = {root}/state
protocols = lmtp
listen = 127.0.0.1
ssl = no
log_path = {self.log_path}
info_log_path = {self.log_path}
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:{root}/mail/%n/Maildir
mail_plugins = quota
quota_full_tempfail = {"yes" if self.quota_full_tempfail else "no"}
lmtp_rcpt_check_quota = no
auth_username_format = %Lu
auth_mechanisms = plain
passdb {{
  driver = passwd-file
  args = {root}/etc/users
}}
userdb {{
  driver = passwd-file
  args = {root}/etc/users
}}
plugin {{
  quota = count:User quota
  quota_vsizes = yes
  quota_rule = *:storage=0
}}
protocol lmtp {{
  mail_plugins = quota
  postmaster_address = postmaster@{self.domain}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
"""
        self.config_path.write_text(conf)

    def _command(self) -> list[str]:
        return [self.dovecot, "-F", "-c", str(self.config_path)]


# ---------------------------------------------------------------------------
# Exim


def exim_binary() -> str:
    """$GATEWAY_TEST_EXIM, else the unpacked Debian build (.ci/install-exim.sh)."""
    path = os.environ.get("GATEWAY_TEST_EXIM", EXIM_DEFAULT)
    _require(
        path if os.path.exists(path) else None,
        f"exim ({path})",
        "run .ci/install-exim.sh (Debian's exim4 conflicts with postfix, so it is "
        "unpacked, not installed), or point GATEWAY_TEST_EXIM at an exim binary",
    )
    return path


class Exim(_Server):
    """A real Exim 4 as a plain SMTP backend on 127.0.0.1:port (`exim -C CONF -bdf`).

    Its own configuration, spool and log directory (mainlog, rejectlog,
    paniclog); Exim runs as `exim_user` (the `mail` user) and delivers as that
    user too, with an appendfile/maildir transport. Known users of `domain`
    are accepted, anybody else is refused at RCPT with Exim's own 550
    ("Unrouteable address"), other domains with "550 relay not permitted".
    """

    name = "exim"
    exim_user = "mail"

    def __init__(
        self,
        workdir: Path,
        *,
        users: Sequence[str] = ("alice", "bob"),
        domain: str = "example.test",
        message_size_limit: str = "10M",
    ) -> None:
        self.exim = exim_binary()
        # The Debian build looks up its compiled-in user (EXIM_USER) before it
        # reads any configuration, so exim_user below cannot stand in for it:
        # without the account every exim command fails.
        _user("Debian-exim", ": run .ci/install-exim.sh, which creates it")
        self.run_as = _user(self.exim_user)
        super().__init__(workdir, users, domain)
        # Run with -C (a configuration not in the binary's trusted list), Exim
        # gives up root for every process it re-executes ("exim user lost
        # privilege for using -C option"), deliveries included: they can only
        # run as the Exim user, so that user owns the mailboxes too.
        self.mailbox_owner = self.run_as
        self.message_size_limit = message_size_limit
        self.config_path = self.root / "etc" / "exim.conf"
        self._first_start()

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "mainlog"

    def reject_log(self) -> str:
        p = self.root / "log" / "rejectlog"
        return p.read_text(errors="replace") if p.exists() else ""

    def panic_log(self) -> str:
        p = self.root / "log" / "paniclog"
        return p.read_text(errors="replace") if p.exists() else ""

    def _diagnostics(self) -> str:
        return super()._diagnostics() + f"\npaniclog:\n{self.panic_log()[-3000:]}"

    def _write_config(self) -> None:
        root, owner, run_as = self.root, self.mailbox_owner, self.run_as
        self._dir("etc")
        self._dir("log", 0o750, run_as)
        self._dir("spool", 0o750, run_as)
        self._dir("run", 0o755, run_as)
        self._dir("mail", 0o755, owner)
        (root / "etc" / "users").write_text("".join(f"{u}: {u}\n" for u in self.users))
        owner_group = _grp_name(owner.pw_gid)
        conf = f"""\
# A test instance: everything under {root}; nothing from /etc/exim4.
exim_path = {self.exim}
primary_hostname = exim.{self.domain}
qualify_domain = {self.domain}
domainlist local_domains = {self.domain}
exim_user = {self.exim_user}
exim_group = {_grp_name(run_as.pw_gid)}
never_users = root
spool_directory = {root}/spool
log_file_path = {root}/log/%slog
pid_file_path = {root}/run/exim.pid
local_interfaces = <; 127.0.0.1
daemon_smtp_ports = {self.port}
message_size_limit = {self.message_size_limit}
keep_environment =
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
pipelining_advertise_hosts = *
smtputf8_advertise_hosts = *
dsn_advertise_hosts = *
accept_8bitmime = true
prdr_enable = false
smtp_accept_queue_per_connection = 0
deliver_drop_privilege = true
log_selector = +smtp_connection +received_recipients +incoming_interface \\
  +incoming_port +smtp_protocol_error +smtp_syntax_error
acl_smtp_rcpt = acl_rcpt

begin acl

acl_rcpt:
  deny    message = relay not permitted
          !domains = +local_domains
  require verify = recipient
  accept

begin routers

users:
  driver = accept
  domains = +local_domains
  local_parts = lsearch;{root}/etc/users
  transport = maildir

begin transports

maildir:
  driver = appendfile
  directory = {root}/mail/$local_part_data/Maildir
  maildir_format
  create_directory
  delivery_date_add
  envelope_to_add
  return_path_add
  user = {owner.pw_name}
  group = {owner_group}
  mode = 0600

begin retry

*  *  F,1h,15s

begin rewrite

begin authenticators
"""
        self.config_path.write_text(conf)
        self.config_path.chmod(0o644)

    def _terminate(self, keeper: _Keeper) -> None:
        """SIGTERM stops Exim's daemon only: the processes serving connections go on
        until their clients leave. A stopped backend in these tests is one whose
        every connection is gone, so those are ended too."""
        super()._terminate(keeper)
        keeper.kill_all()

    def _command(self) -> list[str]:
        # -bdf: the daemon in the foreground; -q15s: a queue runner too, for
        # anything deferred (received mail is delivered at once, not queued).
        return [self.exim, "-C", str(self.config_path), "-bdf", "-q15s", "-oX", str(self.port)]
