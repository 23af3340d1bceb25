"""Tracing of a server: the OpenTelemetry SDK and its OTLP/gRPC exporter, configured by the
standard OTEL_* environment variables and off when none names an endpoint; and one span per call
at the edge (gRPC and HTTP alike), with the W3C `traceparent` a client sends as its parent.

On when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set, unless
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The exporter reads the rest itself
(`OTEL_EXPORTER_OTLP_INSECURE`, `..._HEADERS`, `..._CERTIFICATE`, `..._TIMEOUT`), the batch
processor `OTEL_BSP_*`, the resource `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from memspace_server import spans

if TYPE_CHECKING:
    from opentelemetry.sdk import trace as sdk_trace

log = logging.getLogger(__name__)

SERVICE_NAME = "memspace-server"
PROPAGATED = ("traceparent", "tracestate")
"""Request metadata (gRPC) or headers (HTTP) carrying the caller's trace context (W3C)."""


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


def configure(environ: Mapping[str, str], service_name: str = SERVICE_NAME) -> Tracing | None:
    """Turn tracing on when `environ` asks for it; None (and nothing changed) otherwise."""
    if not wanted(environ):
        return None
    # The SDK only where tracing is on (0.1 s of a server's start otherwise).
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter  # noqa: PLC0415
    from opentelemetry.sdk import resources  # noqa: PLC0415
    from opentelemetry.sdk import trace as sdk_trace  # noqa: PLC0415
    from opentelemetry.sdk.trace import export  # noqa: PLC0415

    resource = resources.Resource.create(
        {resources.SERVICE_NAME: environ.get("OTEL_SERVICE_NAME") or service_name}
    )
    provider = sdk_trace.TracerProvider(resource=resource)
    provider.add_span_processor(export.BatchSpanProcessor(trace_exporter.OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    spans.tracer = provider.get_tracer("memspace_server")
    spans.ENABLED = True
    log.info("tracing on: spans exported over OTLP/gRPC (OTEL_* environment)")
    return Tracing(provider)


@dataclasses.dataclass
class Tracing:
    provider: sdk_trace.TracerProvider

    def shutdown(self) -> None:
        """Export what is buffered, then stop (at the end of a drain)."""
        self.provider.shutdown()


def parent_of(pairs: Iterable[tuple[str, Any]]) -> otel_context.Context | None:
    """The trace context a caller sent in its metadata or headers (None: it sent none, and
    the current context, an HTTP request's span say, is the parent)."""
    carrier = {key: str(value) for key, value in pairs if key in PROPAGATED}
    if "traceparent" not in carrier:
        return None
    return propagate.extract(carrier)


@dataclasses.dataclass
class CallSpan:
    span: trace.Span
    token: object

    def end(self, space: str, code: str) -> None:
        if space:
            self.span.set_attribute(spans.SPACE, space)
        self.span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        self.span.set_attribute("memspace.status", code)
        if code != "OK":
            self.span.set_status(trace.StatusCode.ERROR, code)
        otel_context.detach(self.token)  # type: ignore[arg-type]
        self.span.end()


def start_call(method: str, context: Any) -> CallSpan:
    """The span of one call at the edge (`method`: "MemoryService/Recall"), current until
    `end`: parented on the caller's traceparent, else on the current span (HTTP's)."""
    service, _, name = method.partition("/")
    transport = getattr(context, "transport", "grpc")
    span = spans.tracer.start_span(
        f"memspace.v1.{method}",
        context=parent_of(context.invocation_metadata() or ()),
        kind=trace.SpanKind.SERVER if transport == "grpc" else trace.SpanKind.INTERNAL,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": f"memspace.v1.{service}",
            "rpc.method": name,
            "memspace.transport": transport,
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    return CallSpan(span, token)
