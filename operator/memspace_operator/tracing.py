"""Tracing of the operator: one span per reconcile and finalize of a MemorySpace (with its
namespace, name and space ID), and one per step inside, exported over OTLP/gRPC when the standard
OTEL_* environment variables name an endpoint (as the server's: docs/operations.md, "Tracing");
off otherwise, when each place pays one test of `ENABLED`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from memspace_contract import spaces

log = logging.getLogger(__name__)

SERVICE_NAME = "memspace-operator"
ENABLED = False
tracer = trace.get_tracer("memspace_operator")
_provider: Any = None
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return any(
        environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def configure(environ: Mapping[str, str]) -> None:
    """Turn tracing on when `environ` asks for it (until `shutdown`)."""
    global ENABLED, tracer, _provider  # noqa: PLW0603  # one provider per process, set at startup
    if ENABLED or not wanted(environ):
        return
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter  # noqa: PLC0415
    from opentelemetry.sdk import resources  # noqa: PLC0415
    from opentelemetry.sdk import trace as sdk_trace  # noqa: PLC0415
    from opentelemetry.sdk.trace import export  # noqa: PLC0415

    resource = resources.Resource.create(
        {resources.SERVICE_NAME: environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME}
    )
    provider = sdk_trace.TracerProvider(resource=resource)
    provider.add_span_processor(export.BatchSpanProcessor(trace_exporter.OTLPSpanExporter()))
    # Its own provider, not the process-wide one: a process may start the operator again.
    tracer = provider.get_tracer("memspace_operator")
    _provider = provider
    ENABLED = True
    log.info("tracing on: spans exported over OTLP/gRPC (OTEL_* environment)")


def shutdown() -> None:
    """Export what is buffered and stop (at the operator's cleanup)."""
    global ENABLED, tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    ENABLED, tracer, _provider = False, trace.get_tracer("memspace_operator"), None


def space_span(
    name: str, namespace: str, object_name: str, space_id: spaces.SpaceId
) -> contextlib.AbstractContextManager[trace.Span | None]:
    """The span of one reconcile or finalize of a MemorySpace."""
    if not ENABLED:
        return _OFF
    return tracer.start_as_current_span(
        name,
        attributes={
            "k8s.namespace.name": namespace,
            "memspace.memoryspace": object_name,
            "memspace.space": space_id,
        },
    )


def step(name: str) -> contextlib.AbstractContextManager[trace.Span | None]:
    """The span of one step of the current reconcile."""
    if not ENABLED:
        return _OFF
    return tracer.start_as_current_span(f"memspace.reconcile.{name}")
