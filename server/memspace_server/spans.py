"""Spans inside the server (OpenTelemetry API only): the WAL commit, each tier's scan, a
consolidation. Off until `api.tracing.configure` turns it on (OTEL_* set): then no span is made
and each place pays one test of `ENABLED`. Exporting and the SDK live in `api.tracing`."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

ENABLED = False
"""Spans are made and exported; set once at start by `api.tracing.configure`."""

tracer = trace.get_tracer("memspace_server")

_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()

Context = otel_context.Context

SPACE = "memspace.space"
"""The attribute naming a span's space, on every span of a call about one."""


def current() -> otel_context.Context | None:
    """The context to parent spans made in a worker thread on (threads do not inherit it)."""
    return otel_context.get_current() if ENABLED else None


def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    parent: otel_context.Context | None = None,
) -> contextlib.AbstractContextManager[trace.Span | None]:
    """A child span of `parent` (else of the current span), current while it is open; nothing
    (None) when tracing is off."""
    if not ENABLED:
        return _OFF
    return tracer.start_as_current_span(name, context=parent, attributes=attributes)
