"""The chart as rendered by `helm template` (no cluster): lint, the CRD copy, the values schema,
the operator's settings, restricted pods and the objects that select the operator's shards."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from memspace_contract import spaces
from memspace_operator import naming, shards
from memspace_operator.settings import Settings
from memspace_server import settings as server_settings
from tests.chart.conftest import CHART, Helm, Manifest, env_of, find, full_values, one, values_file
from tests.support import controlplane

CRDS = controlplane.REPO / "crds"
CHART_CRDS = CHART / "files" / "crds"


def shard_objects(settings: Settings) -> tuple[Manifest, Manifest]:
    """A shard's StatefulSet and Service exactly as the operator makes them."""
    statefulset = shards.statefulset(settings, 0, [spaces.SpaceId("notes")], "")
    return statefulset, shards.service(settings, 0)


def pod_specs(objects: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        template = obj.get("spec", {}).get("template", {}).get("spec")
        if template is not None:
            yield f"{obj['kind']}/{obj['metadata']['name']}", template


def restricted_violations(where: str, pod: Mapping[str, Any]) -> list[str]:
    """What keeps a pod spec from Pod Security `restricted` and from a read-only root."""
    found = []
    context = pod.get("securityContext") or {}
    if context.get("runAsNonRoot") is not True:
        found.append(f"{where}: runAsNonRoot is not true")
    if (context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        found.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        found.append(f"{where}: uses host namespaces")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            found.append(f"{where}: hostPath volume {volume['name']}")
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        name = f"{where}/{container['name']}"
        security = container.get("securityContext") or {}
        if security.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if security.get("privileged"):
            found.append(f"{name}: privileged")
        if (security.get("capabilities") or {}).get("drop") != ["ALL"]:
            found.append(f"{name}: capabilities are not all dropped")
        if (security.get("capabilities") or {}).get("add"):
            found.append(f"{name}: adds capabilities")
        if security.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: the root filesystem is writable")
        if security.get("runAsUser") == 0 or context.get("runAsUser") == 0:
            found.append(f"{name}: runs as root")
    return found


# --- lint and the CRD -----------------------------------------------------------------------------


def test_the_chart_lints_strictly_with_default_and_full_values(helm: Helm, tmp_path: Path) -> None:
    helm.run("lint", "--strict", str(CHART))
    with values_file(full_values("memspace-spaces"), tmp_path) as path:
        helm.run("lint", "--strict", str(CHART), "-f", str(path))


def test_the_chart_carries_a_byte_identical_copy_of_every_crd() -> None:
    sources = sorted(path.name for path in CRDS.glob("*.yaml"))
    copies = sorted(path.name for path in CHART_CRDS.glob("*.yaml"))
    assert sources, "crds/ holds no CRD"
    assert copies == sources, "run hack/sync-chart-crd.sh"
    for name in sources:
        assert (CHART_CRDS / name).read_bytes() == (CRDS / name).read_bytes(), (
            f"charts/memspace/files/crds/{name} differs from crds/{name}: "
            "run hack/sync-chart-crd.sh"
        )


@pytest.mark.parametrize("name", ["memoryspaces.memspace.dev", "memoryspaceclasses.memspace.dev"])
def test_the_rendered_crd_is_the_source_kept_on_uninstall(helm: Helm, name: str) -> None:
    source = yaml.safe_load((CRDS / f"{name}.yaml").read_text())
    crd = one(helm.template(), "CustomResourceDefinition", name)
    annotations = crd["metadata"].pop("annotations")
    assert annotations == {"helm.sh/resource-policy": "keep"}
    assert crd == source

    unkept = one(helm.template({"crds": {"keep": False}}), "CustomResourceDefinition", name)
    assert "annotations" not in unkept["metadata"]
    assert unkept == source
    assert find(helm.template({"crds": {"install": False}}), "CustomResourceDefinition") == []


# --- values and their schema ----------------------------------------------------------------------


def _leaves(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        yield path, value
        if isinstance(value, dict) and value and not _is_map(path):
            yield from _leaves(value, path)


_MAPS = {"labels", "annotations", "podAnnotations", "podLabels", "nodeSelector", "affinity"}
_MAPS |= {"clientNamespaceLabels", "clientPodLabels", "metricsNamespaceLabels", "resources"}
_MAPS |= {"issuerRef"}  # a cert-manager ObjectReference, passed through as given
_MAPS |= {"namespaceSelector"}
_MAPS |= {"env"}  # tracing.env: OTEL_* variables, the user's names (the schema checks the prefix)


def _is_map(path: str) -> bool:
    """Values that are free-form maps (labels, resources): their keys are the user's."""
    return path.rsplit(".", 1)[-1] in _MAPS


def _schema_at(schema: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    node = schema
    for key in path.split("."):
        assert node.get("type") == "object", f"{path}: {key}'s parent is not an object"
        assert key in node.get("properties", {}), f"values.schema.json does not describe {path}"
        node = node["properties"][key]
    return node


def test_the_schema_describes_every_value_and_nothing_else() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    described = set()
    for path, _ in _leaves(values):
        node = _schema_at(schema, path)
        described.add(path)
        if node.get("type") == "object" and not _is_map(path):
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
        leaf = not isinstance(_get(values, path), dict) or _is_map(path)
        if leaf:
            assert node.get("description"), f"{path} has no description in the schema"

    def walk(node: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
        for key, child in (node.get("properties") or {}).items():
            path = f"{prefix}.{key}" if prefix else key
            yield path
            if not _is_map(path):
                yield from walk(child, path)

    stale = set(walk(schema)) - described
    assert not stale, f"the schema describes values that values.yaml lacks: {sorted(stale)}"
    assert schema["additionalProperties"] is False


def _get(values: Mapping[str, Any], path: str) -> Any:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"operator": {"replicas": -1}}, "/operator/replicas"),
        ({"operator": {"leaderElection": {"leaseDuration": 1}}}, "/operator/leaderElection"),
        ({"operator": {"replica": 1}}, "'replica' not allowed"),
        ({"server": {"maxShards": 0}}, "/server/maxShards"),
        ({"server": {"maxSpacesPerShard": "20"}}, "/server/maxSpacesPerShard"),
        ({"server": {"mountBatchWindow": 0}}, "/server/mountBatchWindow"),
        ({"server": {"endpointTemplate": "shards.example:50051"}}, "/server/endpointTemplate"),
        ({"serverNamespace": "Memspace_System"}, "/serverNamespace"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"networkPolicy": {"clientNamespaceLabels": {"team": 1}}}, "clientNamespaceLabels/team"),
        ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "/metrics/serviceMonitor"),
        ({"podDisruptionBudget": {"maxUnavailable": 0}}, "/podDisruptionBudget/maxUnavailable"),
        ({"storageClass": "fast"}, "'storageClass' not allowed"),
    ],
)
def test_the_schema_refuses_a_bad_value_saying_where(
    helm: Helm, tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    with values_file(values, tmp_path) as path:
        result = helm.run("template", "memspace", str(CHART), "-f", str(path), check=False)
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


# --- the operator ---------------------------------------------------------------------------------


def test_the_operator_settings_reach_the_operator_as_its_environment(helm: Helm) -> None:
    objects = helm.template(full_values("memspace-spaces"), namespace="memspace-ops")
    env = env_of(one(objects, "Deployment"))
    assert env == {
        "MEMSPACE_SERVER_NAMESPACE": "memspace-spaces",
        "MEMSPACE_SERVER_IMAGE": "registry.example.com/memspace/server@sha256:" + "ab" * 32,
        "MEMSPACE_SERVER_RESOURCES": json.dumps(
            {"limits": {"memory": "16Gi"}, "requests": {"cpu": "2", "memory": "8Gi"}},
            separators=(",", ":"),
        ),
        "MEMSPACE_MAX_SPACES_PER_SHARD": "12",
        "MEMSPACE_MAX_SHARDS": "1000000",
        "MEMSPACE_MOUNT_BATCH_WINDOW": "2.5",
        "MEMSPACE_SHARD_INTAKE_WINDOW": "600",
        "MEMSPACE_SERVER_TOPOLOGY_SPREAD": json.dumps(
            [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                }
            ],
            separators=(",", ":"),
        ),
        "MEMSPACE_SERVER_AFFINITY": "{}",
        "MEMSPACE_HEALTH_INTERVAL": "7.5",
        "MEMSPACE_RESYNC_INTERVAL": "120",
        "MEMSPACE_API_CONCURRENCY": "8",
        "MEMSPACE_ADMIN_TOKEN_SECRET": "shards-admin-token",
        "MEMSPACE_ADMIN_TOKEN_FILE": "/etc/memspace/admin/token",
        "MEMSPACE_METRICS_TOKEN_SECRET": "shards-metrics-token",
        "MEMSPACE_STORAGE_CLASS": "fast-ssd",
        "MEMSPACE_SERVER_SERVICE_ACCOUNT": "memspace-shard",
        "MEMSPACE_SHARD_ENDPOINT_TEMPLATE": (
            "memspace-shard-{shard}.{namespace}.svc.corp.example:50051"
        ),
        "MEMSPACE_TLS_ENABLED": "true",
        "MEMSPACE_TLS_CA_DAYS": "1825",
        "MEMSPACE_TLS_CERT_DAYS": "30",
        "MEMSPACE_CLUSTER_DOMAIN": "corp.example",
        "MEMSPACE_TLS_CLIENT_AUTH": "true",
        "MEMSPACE_LEADER_ELECTION": "true",
        "MEMSPACE_LEASE_DURATION": "20",
        "MEMSPACE_LEASE_RENEW_DEADLINE": "12.5",
        "MEMSPACE_LEASE_RETRY_PERIOD": "3",
        "MEMSPACE_LOG_FORMAT": "json",
        "MEMSPACE_SERVER_ENV": json.dumps(
            {
                "MEMSPACE_EMBEDDING_MODELS": "none",
                "MEMSPACE_EMBEDDING_THREADS": "2",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4317",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
            },
            separators=(",", ":"),
        ),
        "MEMSPACE_EMBEDDING_MODELS": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4317",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    # The operator reads them as meant (and would refuse to start on a bad one).
    settings = Settings.from_env(env)
    assert settings.server_namespace == "memspace-spaces"
    assert settings.max_spaces_per_shard == 12
    assert settings.max_shards == 1000000
    assert settings.mount_batch_window_s == 2.5
    assert settings.health_interval_s == 7.5
    assert settings.resync_interval_s == 120
    assert settings.api_concurrency == 8
    assert settings.storage_class == "fast-ssd"
    assert settings.service_account == "memspace-shard"
    assert settings.admin_token_secret == "shards-admin-token"
    assert settings.metrics_token_secret == "shards-metrics-token"
    assert settings.server_resources == {
        "limits": {"memory": "16Gi"},
        "requests": {"cpu": "2", "memory": "8Gi"},
    }
    assert settings.endpoint(3) == "memspace-shard-3.memspace-spaces.svc.corp.example:50051"
    assert settings.tls_enabled
    assert settings.tls_secret is None
    assert (settings.tls_ca_days, settings.tls_cert_days) == (1825, 30)
    assert settings.cluster_domain == "corp.example"
    assert settings.tls_client_auth
    assert settings.leader_election
    assert settings.lease_name == "memspace-operator"
    assert (settings.lease_duration_s, settings.lease_renew_deadline_s) == (20, 12.5)
    assert settings.lease_retry_period_s == 3
    assert settings.offered_models == ()
    statefulset, _ = shard_objects(settings)
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert f"--tls-client-ca-file={naming.TLS_PATH}/ca.crt" in container["args"]


def test_by_default_the_operator_gets_the_design_s_settings(helm: Helm) -> None:
    objects = helm.template(namespace="memspace-system")
    env = env_of(one(objects, "Deployment"))
    settings = Settings.from_env(env)
    defaults = Settings()
    assert settings.server_namespace == "memspace-system"
    assert settings.server_image == "ghcr.io/memspace/memspace:0.1.0" == defaults.server_image
    assert settings.max_spaces_per_shard == defaults.max_spaces_per_shard == 20
    assert settings.max_shards == defaults.max_shards == 50
    assert settings.mount_batch_window_s == defaults.mount_batch_window_s == 10
    assert settings.health_interval_s == defaults.health_interval_s == 30
    assert settings.resync_interval_s == defaults.resync_interval_s
    assert settings.api_concurrency == defaults.api_concurrency
    assert settings.storage_class is None
    assert settings.shard_endpoint_template == defaults.shard_endpoint_template
    assert settings.admin_token_secret == defaults.admin_token_secret
    assert settings.admin_token_file is not None
    assert settings.tls_enabled is defaults.tls_enabled is True
    assert settings.tls_secret is None
    assert settings.tls_ca_days == defaults.tls_ca_days
    assert settings.tls_cert_days == defaults.tls_cert_days
    assert settings.cluster_domain == defaults.cluster_domain
    assert settings.tls_client_auth is defaults.tls_client_auth is False
    assert settings.leader_election is defaults.leader_election is True
    assert settings.lease_duration_s == defaults.lease_duration_s == 15
    assert settings.lease_renew_deadline_s == defaults.lease_renew_deadline_s == 10
    assert settings.lease_retry_period_s == defaults.lease_retry_period_s == 2
    assert find(objects, "Certificate") == []
    # Every variable the chart sets is one the operator reads.
    known = {Settings.env(name) for name in Settings.model_fields}
    assert set(env) - known == {"MEMSPACE_LOG_FORMAT"}


def test_the_operator_runs_its_replicas_probed_and_with_its_token(helm: Helm) -> None:
    objects = helm.template(full_values("memspace-spaces"), namespace="memspace-ops")
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    # A new pod comes up (a standby) before an old one goes, which releases the Lease.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "memspace-controller"
    assert one(objects, "ServiceAccount", "memspace-controller")["metadata"]["namespace"] == (
        "memspace-ops"
    )
    container = pod["containers"][0]
    assert "--liveness=http://0.0.0.0:9808/healthz" in container["args"]
    assert "--verbose" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert container["ports"] == [{"name": "probes", "containerPort": 9808, "protocol": "TCP"}]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["admin-token"] == "/etc/memspace/admin"
    assert volumes["admin-token"]["secret"]["secretName"] == "shards-admin-token"
    assert mounts["tmp"] == "/tmp"
    assert "emptyDir" in volumes["tmp"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert deployment["spec"]["template"]["metadata"]["labels"]["example.com/team"] == "platform"
    assert container["image"] == "registry.example.com/memspace/memspace:1.2.3"
    assert container["imagePullPolicy"] == "Always"

    assert pod["affinity"] == full_values("memspace-spaces")["operator"]["affinity"]

    paused = one(helm.template({"operator": {"replicas": 0}}), "Deployment")
    assert paused["spec"]["replicas"] == 0


def test_by_default_two_replicas_elect_a_leader_on_different_nodes_and_a_budget_keeps_one(
    helm: Helm, tmp_path: Path
) -> None:
    objects = helm.template(namespace="memspace-system")
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    env = env_of(deployment)
    assert env["MEMSPACE_LEADER_ELECTION"] == "true"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert _selects(term["podAffinityTerm"]["labelSelector"]["matchLabels"], pod_labels)
    budget = one(objects, "PodDisruptionBudget", "memspace-operator")
    assert budget["metadata"]["namespace"] == "memspace-system"
    assert budget["spec"]["minAvailable"] == 1
    assert _selects(budget["spec"]["selector"]["matchLabels"], pod_labels)
    shard_pod = shard_objects(Settings())[0]["spec"]["template"]["metadata"]["labels"]
    assert not _selects(budget["spec"]["selector"]["matchLabels"], shard_pod)
    # The Lease: created by the first replica, then read and renewed only by name.
    (role,) = [r for r in find(objects, "Role") if r["metadata"]["name"] == "memspace-operator"]
    lease_rules = [r for r in role["rules"] if r["apiGroups"] == ["coordination.k8s.io"]]
    assert lease_rules == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [Settings().lease_name],
            "verbs": ["get", "update"],
        },
    ]

    # One replica: no budget (minAvailable 1 would block every drain), no anti-affinity.
    single = helm.template({"operator": {"replicas": 1}})
    assert [b["metadata"]["name"] for b in find(single, "PodDisruptionBudget")] == [
        "memspace-shards"
    ]
    assert "affinity" not in one(single, "Deployment")["spec"]["template"]["spec"]
    # Two replicas without an election would both reconcile: refused, saying why.
    with values_file({"operator": {"leaderElection": {"enabled": False}}}, tmp_path) as path:
        refused = helm.run("template", "memspace", str(CHART), "-f", str(path), check=False)
    assert refused.returncode != 0
    assert "needs operator.leaderElection.enabled" in refused.stderr
    with values_file(
        {"operator": {"replicas": 1, "leaderElection": {"enabled": False}}}, tmp_path
    ) as path:
        alone = helm.run("template", "memspace", str(CHART), "-f", str(path))
    assert "MEMSPACE_LEADER_ELECTION" in alone.stdout
    with values_file({"operator": {"leaderElection": {"renewDeadline": 20}}}, tmp_path) as path:
        refused = helm.run("template", "memspace", str(CHART), "-f", str(path), check=False)
    assert "retryPeriod < renewDeadline < leaseDuration" in refused.stderr


def test_every_pod_memspace_runs_is_restricted(helm: Helm) -> None:
    violations: list[str] = []
    for values in ({}, full_values("memspace-spaces")):
        for where, pod in pod_specs(helm.template(values)):
            violations += restricted_violations(where, pod)
            mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
            if "/tmp" not in mounts:
                violations.append(f"{where}: no emptyDir at /tmp under the read-only root")
    # The shard pods, as the operator makes them from the chart's settings.
    for where, pod in pod_specs(list(shard_objects(Settings()))):
        violations += restricted_violations(f"operator's {where}", pod)
    assert violations == []


def test_the_admin_token_is_random_and_the_same_in_both_namespaces(helm: Helm) -> None:
    def tokens(objects: list[Manifest]) -> dict[str, str]:
        return {
            secret["metadata"]["namespace"]: base64.b64decode(secret["data"]["token"]).decode()
            for secret in find(objects, "Secret", "memspace-admin-token")
        }

    split = tokens(helm.template({"serverNamespace": "spaces"}, namespace="ops"))
    assert set(split) == {"spaces", "ops"}
    assert split["spaces"] == split["ops"]
    assert len(split["ops"]) >= 32
    assert split["ops"].isalnum()
    together = tokens(helm.template(namespace="memspace-system"))
    assert set(together) == {"memspace-system"}
    assert together["memspace-system"] != split["ops"]
    assert (
        find(helm.template({"adminToken": {"create": False}}), "Secret", "memspace-admin-token")
        == []
    )


# --- objects about the shards ---------------------------------------------------------------------


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_by_default_the_network_policy_lets_grpc_in_from_anywhere_and_metrics_from_monitoring(
    helm: Helm,
) -> None:
    plain = one(helm.template(), "NetworkPolicy")
    clients, operator, prometheus = plain["spec"]["ingress"]
    # gRPC from every namespace (each call needs its space's token), metrics from one namespace.
    assert clients == {
        "from": [{"namespaceSelector": {}}],
        "ports": [{"port": "grpc", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}],
    }
    assert operator["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert prometheus == {
        "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        "ports": [{"port": "metrics", "protocol": "TCP"}],
    }
    assert plain["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert find(helm.template({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []
    elsewhere = one(helm.template({"networkPolicy": {"metricsNamespace": "obs"}}), "NetworkPolicy")
    assert elsewhere["spec"]["ingress"][2]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}
    ]


def test_the_network_policy_narrows_to_labelled_clients_the_operator_and_prometheus(
    helm: Helm,
) -> None:
    objects = helm.template(full_values("memspace-spaces"), namespace="memspace-ops")
    policy = one(objects, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "memspace-spaces"
    statefulset, _ = shard_objects(Settings(server_namespace="memspace-spaces"))
    shard_pod = statefulset["spec"]["template"]
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], shard_pod["metadata"]["labels"])
    shard_ports = {p["name"] for p in shard_pod["spec"]["containers"][0]["ports"]}
    assert shard_ports == {"grpc", "http", "metrics"}

    clients, operator, prometheus, extra = policy["spec"]["ingress"]
    assert clients["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"example.com/memspace-client": "yes"}},
            "podSelector": {"matchLabels": {"example.com/agent": "true"}},
        }
    ]
    assert clients["ports"] == [
        {"port": "grpc", "protocol": "TCP"},
        {"port": "http", "protocol": "TCP"},
    ]
    operator_pod = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    (source,) = operator["from"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "memspace-ops"
    }
    assert _selects(source["podSelector"]["matchLabels"], operator_pod)
    assert operator["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert prometheus["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert prometheus["from"] == [
        {"namespaceSelector": {"matchLabels": {"example.com/monitoring": "true"}}}
    ]
    assert extra["from"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= shard_ports
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"] == []


def test_the_disruption_budget_and_service_monitor_select_the_operator_s_shards(
    helm: Helm,
) -> None:
    defaults = helm.template()
    assert find(defaults, "ServiceMonitor") == []
    budget = one(defaults, "PodDisruptionBudget", "memspace-shards")
    assert budget["spec"]["maxUnavailable"] == 1

    objects = helm.template(full_values("memspace-spaces"), namespace="memspace-ops")
    statefulset, service = shard_objects(Settings(server_namespace="memspace-spaces"))
    budget = one(objects, "PodDisruptionBudget")
    assert budget["metadata"]["namespace"] == "memspace-spaces"
    assert budget["spec"]["maxUnavailable"] == "25%"
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert _selects(budget["spec"]["selector"]["matchLabels"], pod_labels)
    # It must not select the operator's own pod.
    operator_pod = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not _selects(budget["spec"]["selector"]["matchLabels"], operator_pod)

    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "memspace-spaces"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["memspace-spaces"]}
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert naming.SHARD in monitor["spec"]["targetLabels"]
    # It sends the shards' metrics token, from a Secret in its own namespace.
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "shards-metrics-token", "key": "token"},
    }
    assert one(objects, "Secret", "shards-metrics-token")["metadata"]["namespace"] == (
        "memspace-spaces"
    )


# --- TLS ------------------------------------------------------------------------------------------


def test_with_an_issuer_the_chart_renders_a_certificate_the_shards_serve(helm: Helm) -> None:
    issuer = {"name": "platform-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    values = {"tls": {"certManager": {"issuerRef": issuer, "secretName": "shards-tls"}}}
    objects = helm.template(values, namespace="memspace-system")
    certificate = one(objects, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["metadata"]["namespace"] == "memspace-system"
    spec = certificate["spec"]
    assert spec["secretName"] == "shards-tls"
    assert spec["issuerRef"] == issuer
    assert spec["dnsNames"] == ["*.memspace-system.svc", "*.memspace-system.svc.cluster.local"]
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert spec["privateKey"]["rotationPolicy"] == "Always"

    settings = Settings.from_env(env_of(one(objects, "Deployment")))
    assert settings.tls_enabled
    assert settings.tls_secret == "shards-tls"
    # What the tenants dial, for any shard, is covered by the wildcard.
    host = settings.endpoint(17).rpartition(":")[0]
    assert f"*.{host.split('.', 1)[1]}" in spec["dnsNames"]
    statefulset, _ = shard_objects(settings)
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "tls", "secret": {"secretName": "shards-tls"}} in pod["volumes"]
    assert f"--tls-cert-file={naming.TLS_PATH}/tls.crt" in container["args"]


def test_with_tls_off_the_shards_run_insecure_and_no_certificate_is_made(helm: Helm) -> None:
    issuer = {"name": "platform-ca", "kind": "Issuer"}
    values = {"tls": {"enabled": False, "certManager": {"issuerRef": issuer}}}
    objects = helm.template(values, namespace="memspace-system")
    assert find(objects, "Certificate") == []
    env = env_of(one(objects, "Deployment"))
    assert env["MEMSPACE_TLS_ENABLED"] == "false"
    assert "MEMSPACE_TLS_SECRET" not in env
    settings = Settings.from_env(env)
    statefulset, _ = shard_objects(settings)
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert "--insecure" in container["args"]
    assert not [arg for arg in container["args"] if arg.startswith("--tls-")]


def test_mutual_tls_with_cert_manager_is_refused_saying_why(helm: Helm, tmp_path: Path) -> None:
    values = {"tls": {"clientAuth": True, "certManager": {"issuerRef": {"name": "ca"}}}}
    with values_file(values, tmp_path) as path:
        result = helm.run("template", "memspace", str(CHART), "-f", str(path), check=False)
    assert result.returncode != 0
    assert "tls.clientAuth needs the operator's own CA" in result.stderr


def test_the_metrics_token_is_random_kept_where_the_shards_and_the_monitor_are(
    helm: Helm,
) -> None:
    def tokens(objects: list[Manifest]) -> dict[str, str]:
        return {
            secret["metadata"]["namespace"]: base64.b64decode(secret["data"]["token"]).decode()
            for secret in find(objects, "Secret", "memspace-metrics-token")
        }

    defaults = helm.template(namespace="memspace-system")
    assert set(tokens(defaults)) == {"memspace-system"}
    assert len(tokens(defaults)["memspace-system"]) >= 32
    env = env_of(one(defaults, "Deployment"))
    assert env["MEMSPACE_METRICS_TOKEN_SECRET"] == "memspace-metrics-token"
    # The shard pods the operator makes from those settings require it on the metrics port.
    statefulset, _ = shard_objects(Settings.from_env(env))
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-token-file=/etc/memspace/metrics/token" in container["args"]

    monitored = {"metrics": {"serviceMonitor": {"enabled": True, "namespace": "monitoring"}}}
    split = tokens(helm.template(monitored, namespace="memspace-system"))
    assert set(split) == {"memspace-system", "monitoring"}
    assert split["memspace-system"] == split["monitoring"]

    off = helm.template({"metrics": {"auth": {"enabled": False}}})
    assert find(off, "Secret", "memspace-metrics-token") == []
    assert "MEMSPACE_METRICS_TOKEN_SECRET" not in env_of(one(off, "Deployment"))


def test_the_admission_policies_are_rendered_when_enabled(helm: Helm) -> None:
    defaults = helm.template(namespace="memspace-system")
    # By default: only the one on the operator's own Secret deletions.
    (policy,) = find(defaults, "ValidatingAdmissionPolicy")
    assert policy["metadata"]["name"].endswith("-operator-secrets")
    (condition,) = policy["spec"]["matchConditions"]
    assert "system:serviceaccount:memspace-system:memspace-operator" in condition["expression"]
    (binding,) = find(defaults, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]

    objects = helm.template(full_values("memspace-spaces"), namespace="memspace-ops")
    names = sorted(p["metadata"]["name"] for p in find(objects, "ValidatingAdmissionPolicy"))
    assert len(names) == 2
    assert names[0].endswith("-operator-secrets")
    assert names[1].endswith("-space-id-prefix")
    prefix_binding = next(
        b
        for b in find(objects, "ValidatingAdmissionPolicyBinding")
        if b["metadata"]["name"].endswith("-space-id-prefix")
    )
    assert prefix_binding["spec"]["matchResources"] == {
        "namespaceSelector": {"matchLabels": {"example.com/tenant": "true"}}
    }
    nothing = {"admission": {"operatorSecrets": {"enabled": False}}}
    assert find(helm.template(nothing), "ValidatingAdmissionPolicy") == []


def test_the_offered_embedding_models_reach_the_operator_and_every_shard(helm: Helm) -> None:
    env = env_of(one(helm.template(), "Deployment"))
    settings = Settings.from_env(env)
    assert settings.offered_models == ("wordllama-l2-256",)
    statefulset, _ = shard_objects(settings)
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    shard_env = {e["name"]: e["value"] for e in container["env"]}
    served = server_settings.load({}, {**shard_env, "MEMSPACE_DATA_ROOT": "/var/lib/memspace"})
    assert served.offered_models == ("wordllama-l2-256",)
    assert served.embedding_threads == 1
    chosen = {"server": {"embedding": {"models": [], "threads": 2}}}
    env = env_of(one(helm.template(chosen), "Deployment"))
    assert Settings.from_env(env).offered_models == ()
    with pytest.raises(controlplane.KubectlError, match="embedding"):
        helm.template({"server": {"embedding": {"models": ["no-such-model"]}}})


def test_tracing_env_reaches_the_operator_and_every_shard(helm: Helm) -> None:
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env_of(one(helm.template(), "Deployment"))
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4317",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    env = env_of(one(helm.template({"tracing": {"env": otel}}), "Deployment"))
    assert {name: env[name] for name in otel} == otel
    settings = Settings.from_env(env)
    statefulset, _ = shard_objects(settings)
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    embedding = {"MEMSPACE_EMBEDDING_MODELS": "wordllama-l2-256", "MEMSPACE_EMBEDDING_THREADS": "1"}
    assert container["env"] == [
        {"name": name, "value": value} for name, value in sorted({**otel, **embedding}.items())
    ]
    with pytest.raises(controlplane.KubectlError, match="OTEL_"):
        helm.template({"tracing": {"env": {"PATH": "/tmp"}}})  # only OTEL_* variables
