"""Structured logs: one line per event, JSON or key=value, with the session id.

Events (`event()`) do not go through `logging`'s records: a LogRecord, a handler
lock and a write per line cost a small message 15% of the gateway's throughput at
INFO (two lines each: the transaction and the disconnect). An event is formatted
straight into a line and queued; the queue leaves in one write FLUSH_DELAY after
its first line, or at once when it passes FLUSH_BYTES or a warning joins it.
Why a delay rather than the end of each event-loop iteration: at 2,000 messages
a second that was a flush scheduled and a write made for nearly every message,
5% of the CPU of a small message with one worker (bench, 11-30). Other loggers'
records (warnings, tracebacks) join the same queue in order, through the one
handler `setup` installs, and take the queue with them at once.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

_events = logging.getLogger("gateway.events")

# A line waits at most this long (seconds) for others to leave with it: what a
# crash that skips atexit (SIGKILL, the OOM killer) can lose, and what `tail -f`
# lags by.
FLUSH_DELAY = 0.05
# Queued text past this many characters leaves at once (a burst of lines).
FLUSH_BYTES = 64 * 1024


# One encoder for every line: json.dumps(..., default=str) builds a new one per call.
_encode = json.JSONEncoder(default=str).encode


def _json_line(ts: float, level: str, logger: str, pid: int, fields: dict[str, Any]) -> str:
    return _encode({"ts": round(ts, 3), "level": level, "logger": logger, "pid": pid, **fields})


def _kv_line(ts: float, level: str, logger: str, pid: int, fields: dict[str, Any]) -> str:
    body = " ".join(f"{k}={_kv(v)}" for k, v in fields.items())
    return f"ts={ts:.3f} level={level} logger={logger} pid={pid} {body}"


def _kv(v: Any) -> str:
    s = str(v)
    if s and all(c.isalnum() or c in "._-:/@<>[]" for c in s):
        return s
    return json.dumps(s)


class _Output:
    """The lines not yet written, and where they go."""

    def __init__(self) -> None:
        self.stream: TextIO = sys.stderr
        self.format = _json_line
        self.lines: list[str] = []
        self.size = 0  # characters queued in `lines`
        # The loop whose timer writes the queue, once a flush is scheduled.
        self.pending: asyncio.AbstractEventLoop | None = None
        self.pid = os.getpid()
        # Threads log too (the DKIM and ARC pools): a line must not fall between a
        # flush's join and its clear.
        self.lock = threading.Lock()

    def add(self, line: str, urgent: bool = False) -> None:
        with self.lock:
            self.lines.append(line)
            self.size += len(line)
            full = self.size > FLUSH_BYTES
        if urgent or full:
            self.flush()
            return
        pending = self.pending
        if pending is not None and pending.is_running():
            return  # its flush is scheduled (asking for the running loop costs a getpid)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # start-up, shutdown, the CLI, a thread: no loop to wait on
            self.flush()
            return
        # (A loop that stopped before its flush left `pending` behind: scheduled anew.)
        self.pending = loop
        loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        # A timer of an earlier schedule may still come: it finds the queue empty.
        self.pending = None
        with self.lock:
            if not self.lines:
                return
            data = "\n".join(self.lines) + "\n"
            self.lines.clear()
            self.size = 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # as logging.Handler does: a log that cannot be written stops nothing

    def after_fork(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.lines.clear()  # the parent's, which it writes itself
        self.size = 0
        self.pending = None


_out = _Output()
atexit.register(_out.flush)
os.register_at_fork(before=_out.flush, after_in_child=_out.after_fork)


class _Handler(logging.Handler):
    """Every other logger's records, as lines in the same queue (so in order)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"msg": record.getMessage()}
            if record.exc_info:
                fields["exc"] = logging.Formatter().formatException(record.exc_info)
            level = record.levelname.lower()
            line = _out.format(record.created, level, record.name, record.process or 0, fields)
            # A warning or worse leaves at once, with what was queued before it: it
            # may be the last thing this process says.
            _out.add(line, urgent=record.levelno >= logging.WARNING)
        except Exception:
            self.handleError(record)


def setup(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    # Lines still queued (a loop that stopped before its timer wrote them) go where
    # they were logged for, never into the new stream.
    _out.flush()
    _out.stream = stream or sys.stderr
    _out.format = _json_line if fmt == "json" else _kv_line
    root = logging.getLogger()
    root.handlers[:] = [_Handler()]
    root.setLevel(level)


def enabled() -> bool:
    """Whether events are logged: callers on the per-message path ask first, so
    that below INFO they do not even build the fields."""
    return _events.isEnabledFor(logging.INFO)


def event(name: str, **fields: Any) -> None:
    if _events.isEnabledFor(logging.INFO):
        fields = {"event": name, **fields}
        _out.add(_out.format(time.time(), "info", "gateway.events", _out.pid, fields))


def failure(name: str, *, severe: bool = False, **fields: Any) -> None:
    """An event that needs an operator (a refused reload, a lost backend): logged at
    warning level (severe: at error level), so `logging.level: WARNING` keeps it,
    and written at once."""
    level = logging.ERROR if severe else logging.WARNING
    if _events.isEnabledFor(level):
        fields = {"event": name, **fields}
        line = _out.format(time.time(), logging.getLevelName(level).lower(), "gateway.events",
                           _out.pid, fields)  # fmt: skip
        _out.add(line, urgent=True)


def flush() -> None:
    """Write what is queued now (before a process ends without atexit: os._exit)."""
    _out.flush()
