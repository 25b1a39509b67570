"""Structured logs: one line per event, JSON or key=value, with the session id."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_events = logging.getLogger("gateway.events")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if fields:
            data.update(fields)
        else:
            data["msg"] = record.getMessage()
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class KvFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        head = (
            f"ts={record.created:.3f} level={record.levelname.lower()} logger={record.name} "
            f"pid={record.process}"
        )
        fields = getattr(record, "fields", None)
        if fields:
            body = " ".join(f"{k}={_kv(v)}" for k, v in fields.items())
        else:
            body = f"msg={_kv(record.getMessage())}"
        out = f"{head} {body}"
        if record.exc_info:
            out += " exc=" + _kv(self.formatException(record.exc_info))
        return out


def _kv(v: Any) -> str:
    s = str(v)
    if s and all(c.isalnum() or c in "._-:/@<>[]" for c in s):
        return s
    return json.dumps(s)


def setup(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KvFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def enabled() -> bool:
    """Whether events are logged: callers on the per-message path ask first, so
    that below INFO they do not even build the fields."""
    return _events.isEnabledFor(logging.INFO)


def event(name: str, **fields: Any) -> None:
    if _events.isEnabledFor(logging.INFO):
        _events.info(name, extra={"fields": {"event": name, **fields}})
