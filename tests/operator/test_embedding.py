"""spec.embedding on the local control plane: the model and its dimension reach the shard's
index entry; a dimension that disagrees with the model, or a model the platform does not offer,
is refused with a Ready condition that says so; the API server keeps the model immutable."""

from __future__ import annotations

import json

import pytest

from memspace_contract import index, models
from tests.operator.conftest import Deployment, condition, memory_space

pytestmark = pytest.mark.cluster

MODEL = models.MODELS[models.DEFAULT_MODEL]


def test_a_space_with_a_model_gets_it_in_its_index_entry(deployment: Deployment) -> None:
    with deployment.running():
        deployment.apply("notes", embedding={"model": MODEL.name})
        deployment.wait_condition("notes", "Mounted", "True")
        doc = deployment.index(0)["notes.json"]
        assert doc["embedding"] == {"model": MODEL.name}
        assert doc["embeddingDim"] == MODEL.dim
        entry = index.parse_entry(doc)
        assert entry.embedding == index.Embedding(model=MODEL.name)
        # A space without a model: no embedding key, the default dimension, as before.
        deployment.apply("plain")
        deployment.wait_condition("plain", "Mounted", "True")
        plain = deployment.index(0)["plain.json"]
        assert "embedding" not in plain
        assert plain["embeddingDim"] == index.DEFAULT_EMBEDDING_DIM

        # Another dimension beside the model: not served, and the condition says why.
        deployment.apply("clash", embedding={"model": MODEL.name}, embeddingDim=768)
        body = deployment.wait_condition("clash", "Ready", "False", "InvalidSpec")
        message = condition(body, "Ready")["message"]
        assert f"makes {MODEL.dim}-dimensional vectors" in message, message
        assert "clash.json" not in deployment.index(0)

    # The model cannot be changed or removed once set (the stored vectors are the model's).
    result = deployment.cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(memory_space("notes", deployment.namespace)),
        check=False,
    )
    assert result.returncode != 0
    assert "spec.embedding" in result.stderr, result.stderr


def test_a_model_the_platform_does_not_offer_is_refused(deployment: Deployment) -> None:
    with deployment.running(MEMSPACE_EMBEDDING_MODELS="none"):
        deployment.apply("unoffered", embedding={"model": MODEL.name})
        body = deployment.wait_condition("unoffered", "Ready", "False", "InvalidSpec")
        message = condition(body, "Ready")["message"]
        assert "not offered on this platform" in message, message
        assert "server.embedding.models" in message
        assert "unoffered.json" not in deployment.index(0)
