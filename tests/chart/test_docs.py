"""What the install guide tells a newcomer to apply is admitted as it is: the client pod of
docs/install.md passes Pod Security `restricted` on the API server (and the check is real: the
same pod without its securityContext is refused). The scripts the docs name exist."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import RESTRICTED, create_namespace, unique
from tests.support import cluster as harness

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def install_guide_pod() -> dict[str, Any]:
    text = (REPO / "docs/install.md").read_text()
    found = [
        yaml.safe_load(body)
        for lang, body in BLOCK.findall(text)
        if lang == "yaml" and "name: memspace-client" in body
    ]
    assert len(found) == 1, "docs/install.md has one client pod"
    pod: dict[str, Any] = found[0]
    return pod


def test_the_install_guide_s_client_pod_is_admitted_where_restricted_is_enforced(
    cluster: harness.Cluster,
) -> None:
    pod = install_guide_pod()
    assert pod["kind"] == "Pod"
    container = pod["spec"]["containers"][0]
    assert container["image"]
    assert container["volumeMounts"][0]["mountPath"] == "/var/run/memspace"
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "notes-memspace"
    namespace = unique("restricted-tenant")
    create_namespace(cluster, namespace, RESTRICTED)
    try:
        pod["metadata"]["namespace"] = namespace
        admitted = cluster.kubectl(
            "create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False
        )
        assert admitted.returncode == 0, admitted.stderr
        assert admitted.stderr.strip() == "", admitted.stderr  # not even a warning
        bare = copy.deepcopy(pod)
        del bare["spec"]["securityContext"]
        del bare["spec"]["containers"][0]["securityContext"]
        refused = cluster.kubectl(
            "create", "--dry-run=server", "-f", "-", input=json.dumps(bare), check=False
        )
        assert refused.returncode != 0
        assert 'violates PodSecurity "restricted' in refused.stderr
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_every_script_the_docs_name_exists() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {
        (page.name, script)
        for page in pages
        for script in re.findall(r"(?<!Kubernetes' `)hack/[\w./-]+\.sh", page.read_text())
    }
    assert named, "the docs name no script at all"
    missing = sorted((page, script) for page, script in named if not (REPO / script).exists())
    assert missing == []
    kind = sorted({script for _, script in named if "kind" in script})
    assert kind == ["hack/e2e-kind.sh"], kind
