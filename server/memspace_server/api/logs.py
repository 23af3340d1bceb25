"""Structured logs: the space, RPC method and request ID of the current call are bound once at
the edge (contextvars) and added to every record logged while it runs, in text or JSON."""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from typing import Any

_space: contextvars.ContextVar[str] = contextvars.ContextVar("memspace_space", default="")
_method: contextvars.ContextVar[str] = contextvars.ContextVar("memspace_method", default="")
_request: contextvars.ContextVar[str] = contextvars.ContextVar("memspace_request", default="")

FIELDS = ("space", "method", "request_id")


def bind(space: str, method: str, request_id: str) -> None:
    """Bind the call's identity to the current task (each RPC runs in a task of its own)."""
    _space.set(space)
    _method.set(method)
    _request.set(request_id)


def bind_space(space: str) -> None:
    _space.set(space)


def request_id() -> str:
    return _request.get()


class ContextFilter(logging.Filter):
    """Adds the bound call fields to every record (empty outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.space = _space.get()
        record.method = _method.get()
        record.request_id = _request.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        bound = [f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, "")]
        if not bound:
            return line
        head, _, rest = line.partition("\n")
        return f"{head} [{' '.join(bound)}]" + (f"\n{rest}" if rest else "")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the bound fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, "")
            if value:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(level: str, fmt: str) -> None:
    """Route the root logger to stderr in the given format (called once, by `memspace serve`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
