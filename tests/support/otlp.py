"""A real OTLP/gRPC trace receiver for the tests: a gRPC server (its own threads, so sync and
async tests alike can use it) implementing the opentelemetry-proto collector's TraceService on a
loopback port, keeping every span exported to it (what an OpenTelemetry Collector receives)."""

from __future__ import annotations

import dataclasses
import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as collector
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as collector_grpc
from opentelemetry.proto.common.v1 import common_pb2


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int
    service: str


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Receiver(collector_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.server: grpc.Server | None = None
        self.port = 0
        self._lock = threading.Lock()

    def Export(  # noqa: N802  # the name of the OTLP method
        self, request: collector.ExportTraceServiceRequest, context: Any
    ) -> collector.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = ""
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service = str(_value(attribute.value))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self._add(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            service=service,
                        )
                    )
        return collector.ExportTraceServiceResponse()

    def _add(self, span: ReceivedSpan) -> None:
        with self._lock:
            self.spans.append(span)

    def start(self) -> str:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        # opentelemetry-proto's generated gRPC code has no type hints.
        collector_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None).wait()

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]

    def children(self, parent: ReceivedSpan, name: str | None = None) -> list[ReceivedSpan]:
        return [
            span
            for span in self.spans
            if span.parent_span_id == parent.span_id
            and span.trace_id == parent.trace_id
            and (name is None or span.name == name)
        ]
