"""Prometheus metrics of one server, on a port of their own: requests and errors per space and
method, latency per method, and the health of every loaded space (refreshed by housekeeping, so
a scrape never touches the event loop's state).

Only spaces in the index are used as label values: a client naming random space IDs cannot
grow the metrics without bound."""

from __future__ import annotations

import dataclasses
import http.server
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import prometheus_client
from prometheus_client import core

from memspace_contract import wire
from memspace_server.api import tokens
from memspace_server.storage.spaces import Health

NAMESPACE = "memspace"
LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    spaces: int = 0
    loaded: int = 0
    draining: bool = False
    health: Mapping[str, Health] = dataclasses.field(default_factory=dict)


class _SpaceCollector:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        snap = self._metrics.snapshot
        yield core.GaugeMetricFamily(
            f"{NAMESPACE}_spaces", "Spaces in this server's index", value=snap.spaces
        )
        yield core.GaugeMetricFamily(
            f"{NAMESPACE}_spaces_loaded", "Spaces loaded in memory", value=snap.loaded
        )
        yield core.GaugeMetricFamily(
            f"{NAMESPACE}_draining", "1 while the server drains", value=int(snap.draining)
        )
        gauges: dict[str, tuple[str, Callable[[Health], float]]] = {
            "memories": ("Memories in the space", lambda h: h.memories),
            "pressure": ("Hot memories / hotCapacity", lambda h: h.pressure),
            "wal_lag_ms": (
                "Age of the oldest WAL record not yet consolidated (ms)",
                lambda h: h.wal_lag_ms,
            ),
            "consolidation_rate": (
                "Memories consolidated per second (60 s moving average)",
                lambda h: h.consolidation_rate,
            ),
            "disk_bytes": ("Bytes on the space's volume", lambda h: h.disk_bytes),
        }
        for name, (doc, value) in gauges.items():
            family = core.GaugeMetricFamily(f"{NAMESPACE}_space_{name}", doc, labels=["space"])
            for space, health in snap.health.items():
                family.add_metric([space], value(health))
            yield family
        tiers = core.GaugeMetricFamily(
            f"{NAMESPACE}_space_tier_memories", "Memories per tier", labels=["space", "tier"]
        )
        up = core.GaugeMetricFamily(
            f"{NAMESPACE}_space_up", "1 when the space is Active and not failed", labels=["space"]
        )
        for space, health in snap.health.items():
            for tier, count in health.tier_memories.items():
                tiers.add_metric([space, tier], count)
            up.add_metric([space], int(health.state == wire.ACTIVE))
        yield tiers
        yield up
        recall = core.GaugeMetricFamily(
            f"{NAMESPACE}_space_recall_at_k",
            "Mean recall@k of sampled approximate recalls against an exact scan (spaces "
            "searched through an HNSW graph, once a sample is measured)",
            labels=["space"],
        )
        indexed = core.GaugeMetricFamily(
            f"{NAMESPACE}_space_index_rows",
            "Warm and cold rows covered by the space's HNSW graphs",
            labels=["space", "type", "state"],
        )
        for space, health in snap.health.items():
            status = health.index
            if status is None:
                continue
            indexed.add_metric([space, status.type, status.state], status.rows)
            if status.recall is not None:
                recall.add_metric([space], status.recall)
        yield recall
        yield indexed


class _BySpace:
    """The series of a metric labelled by space first, kept at hand (`labels` costs more than
    a call's path should pay) and dropped with their space."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._series: dict[tuple[str, ...], Any] = {}

    def series(self, *labels: str) -> Any:
        found = self._series.get(labels)
        if found is None:
            found = self._series[labels] = self.metric.labels(*labels)
        return found

    def forget_spaces_except(self, known: set[str]) -> None:
        for labels in [k for k in self._series if k[0] and k[0] not in known]:
            del self._series[labels]
            self.metric.remove(*labels)


class Metrics:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            f"{NAMESPACE}_requests",
            "RPCs handled, by space, method and status code",
            ["space", "method", "code"],
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            f"{NAMESPACE}_request_duration_seconds",
            "Latency of unary RPCs by method (streams are not timed)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.turn_waits = prometheus_client.Counter(
            f"{NAMESPACE}_turn_wait_seconds",
            "Seconds unary calls waited for their space's turn or share of time while spaces "
            "shared the server, by space (a space whose clients send more calls than its share)",
            ["space"],
            registry=self.registry,
        )
        self.snapshot = Snapshot()
        self.registry.register(_SpaceCollector(self))
        self._requests = _BySpace(self.requests)
        self._waits = _BySpace(self.turn_waits)
        self._histograms: dict[str, Any] = {}
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def observe(self, space: str, method: str, code: str, seconds: float | None) -> None:
        self._requests.series(space, method, code).inc()
        if seconds is not None:
            histogram = self._histograms.get(method)
            if histogram is None:
                histogram = self._histograms[method] = self.latency.labels(method)
            histogram.observe(seconds)

    def waited(self, space: str, seconds: float) -> None:
        """A call of `space` waited `seconds` for its turn (`sharing.Turns`)."""
        self._waits.series(space).inc(seconds)

    def forget_spaces_except(self, known: set[str]) -> None:
        """Drop the request and wait series of spaces that left the index (deleted)."""
        self._requests.forget_spaces_except(known)
        self._waits.forget_spaces_except(known)

    def start(self, host: str, port: int, token: tokens.TokenFile | None = None) -> int:
        """Serve `/metrics` on HOST:PORT in a thread. With `token`, a scrape without
        `Authorization: Bearer <token>` gets 401 and nothing else."""
        self._http = _MetricsHttp((host, port), _handler(self, token))
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            # `stop` waits for the loop to see it (a drain, which a restarting shard's successor
            # waits for): at the default 0.5 s poll that was up to half a second.
            kwargs={"poll_interval": STOP_POLL_S},
            name="memspace-metrics",
            daemon=True,
        )
        self._thread.start()
        self.port = int(self._http.server_port)
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def exposition(self) -> bytes:
        return bytes(prometheus_client.generate_latest(self.registry))


STOP_POLL_S = 0.05
"""How often the metrics port's thread looks for `stop`."""


class _MetricsHttp(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _handler(metrics: Metrics, token: tokens.TokenFile | None) -> type[Any]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            if token is not None and not token.admits(self.headers.get("Authorization")):
                self._answer(401, b"a bearer token is required\n", "text/plain; charset=utf-8")
                return
            if self.path.split("?", 1)[0] not in ("/", "/metrics"):
                self._answer(404, b"not found; metrics are at /metrics\n", "text/plain")
                return
            self._answer(200, metrics.exposition(), prometheus_client.CONTENT_TYPE_LATEST)

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="memspace-metrics"')
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # http.server's name
            """Scrapes are not logged (one line every few seconds per scraper)."""

    return Handler
