"""The operator's reconcile steps as spans, exported to a real OTLP/gRPC receiver started by the
test (tests/support/otlp.py): one span per reconcile with the MemorySpace's namespace, name and
space ID, its steps as children; nothing is traced once the operator stops."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from memspace_operator import tracing
from tests.operator.conftest import Deployment
from tests.support.otlp import Receiver

pytestmark = pytest.mark.cluster


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.start()
    yield found
    found.stop()


def test_a_reconcile_and_its_steps_are_exported_with_their_parent_links(
    deployment: Deployment, receiver: Receiver
) -> None:
    with deployment.running(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
    ):
        deployment.apply("traced", spaceId="traced-space")
        deployment.wait_condition("traced", "VolumeBound", "True")
    # The operator's cleanup exported what it buffered and turned tracing off again.
    assert tracing.ENABLED is False
    reconciles = [
        span
        for span in receiver.named("memspace.reconcile")
        if span.attributes.get("memspace.memoryspace") == "traced"
    ]
    assert reconciles, [span.name for span in receiver.spans]
    first = reconciles[0]
    assert first.attributes["k8s.namespace.name"] == deployment.namespace
    assert first.attributes["memspace.space"] == "traced-space"
    assert first.service == "memspace-operator"
    steps = {span.name for span in receiver.children(first)}
    assert {"memspace.reconcile.class", "memspace.reconcile.claim"} <= steps, steps
    for reconcile in reconciles:
        for step in receiver.children(reconcile):
            assert step.trace_id == reconcile.trace_id
            assert step.name.startswith("memspace.reconcile.")
