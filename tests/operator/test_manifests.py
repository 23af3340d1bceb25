"""Settings, spec parsing, names and shard manifests, without a cluster."""

from __future__ import annotations

import json

import pytest

from memspace_contract import index, spaces
from memspace_operator import credentials, errors, models, naming, shards, volumes
from memspace_operator.settings import Settings, SettingsError


def test_settings_come_from_the_environment_over_the_defaults() -> None:
    settings = Settings.from_env(
        {
            "MEMSPACE_SERVER_NAMESPACE": "spaces",
            "MEMSPACE_MAX_SPACES_PER_SHARD": "7",
            "MEMSPACE_MOUNT_BATCH_WINDOW": "2.5",
            "MEMSPACE_SERVER_RESOURCES": json.dumps({"requests": {"cpu": "1"}}),
            "MEMSPACE_SHARD_ENDPOINT_TEMPLATE": "127.0.0.1:40{shard:03d}",
        }
    )
    assert settings.server_namespace == "spaces"
    assert settings.max_spaces_per_shard == 7
    assert settings.max_shards == 50
    assert settings.mount_batch_window_s == 2.5
    assert settings.health_interval_s == 30
    assert settings.endpoint(3) == "127.0.0.1:40003"
    assert Settings().endpoint(2) == "memspace-shard-2.memspace-system.svc:50051"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MEMSPACE_MAX_SHARDS", "0"),
        ("MEMSPACE_MAX_SHARDS", "many"),
        ("MEMSPACE_HEALTH_INTERVAL", "-1"),
        ("MEMSPACE_SERVER_NAMESPACE", "Not_A_Namespace"),
        ("MEMSPACE_SHARD_ENDPOINT_TEMPLATE", "{host}:50051"),
        ("MEMSPACE_SERVER_RESOURCES", "[1]"),
    ],
)
def test_a_bad_setting_is_refused_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_a_spec_is_parsed_with_the_defaults_of_the_crd() -> None:
    space = models.parse(
        {
            "metadata": {"namespace": "team", "name": "notes", "uid": "u", "generation": 2},
            "spec": {"embeddingDim": 8, "quota": {"maxMemories": 10}},
        }
    )
    assert space.ref == models.SpaceRef("team", "notes", "u")
    assert space.spec.space_id == "notes"
    assert space.spec.size == "10Gi"
    assert space.spec.reclaim_policy == "Retain"
    assert space.spec.tiers == index.Tiers()
    assert space.spec.quota == index.Quota(max_memories=10)
    entry = models.index_entry(space.spec, "ab" * 32, 4)
    assert index.loads(entry.dumps()) == entry


@pytest.mark.parametrize(
    "spec",
    [
        {"spaceId": "Bad!"},
        {"embeddingDim": 0},
        {"storage": {"size": "lots"}},
        {"tiers": {"warmCapacity": 0}},
        {"state": "Paused"},
    ],
)
def test_an_unusable_spec_is_a_permanent_error(spec: dict[str, object]) -> None:
    with pytest.raises(errors.InvalidSpecError):
        models.parse({"metadata": {"name": "ok-name"}, "spec": spec})


def test_long_names_are_shortened_deterministically() -> None:
    long_id = spaces.parse_space_id("a" * 63)
    assert naming.claim_name(long_id) == "space-" + "a" * 63
    volume = naming.volume_name(long_id)
    assert len(volume) <= 63
    assert volume == naming.volume_name(long_id)
    assert len(naming.label_value("n" * 200)) == 63
    assert len(naming.credentials_secret("n" * 250)) <= 253


def test_a_token_is_32_random_bytes_in_url_safe_base64() -> None:
    tokens = {credentials.new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(token) == 43 and "=" not in token for token in tokens)


def test_a_shard_template_mounts_each_space_at_its_path_in_a_stable_order() -> None:
    settings = Settings()
    ids = [spaces.parse_space_id(n) for n in ("beta", "alpha")]
    body = shards.statefulset(settings, 4, ids, "now")
    assert shards.mounted_spaces(body) == frozenset(ids)
    again = shards.statefulset(settings, 4, reversed(ids), "later")
    assert not shards.template_differs(body, again)
    fewer = shards.statefulset(settings, 4, ids[:1], "later")
    assert shards.template_differs(body, fewer)
    spec = body["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["volumes"][0] == {
        "name": "index",
        "secret": {"secretName": "memspace-shard-4-spaces"},
    }
    assert "--index-dir=/etc/memspace/spaces" in spec["containers"][0]["args"]


def test_defaults_the_api_server_adds_do_not_count_as_a_template_change() -> None:
    settings = Settings()
    desired = shards.statefulset(settings, 0, [spaces.parse_space_id("one")], "now")
    current = json.loads(json.dumps(desired))
    container = current["spec"]["template"]["spec"]["containers"][0]
    container["terminationMessagePath"] = "/dev/termination-log"
    current["spec"]["template"]["spec"]["volumes"][0]["secret"]["defaultMode"] = 420
    assert not shards.template_differs(current, desired)


def test_with_a_metrics_token_the_shard_mounts_it_and_its_metrics_port_requires_it() -> None:
    plain = shards.pod_spec(Settings(), 0, [])
    assert not any("metrics-token" in arg for arg in plain["containers"][0]["args"])
    settings = Settings(metrics_token_secret="memspace-metrics-token")
    pod = shards.pod_spec(settings, 0, [])
    container = pod["containers"][0]
    assert "--metrics-token-file=/etc/memspace/metrics/token" in container["args"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["metrics-token"]["secret"] == {
        "secretName": "memspace-metrics-token",
        "optional": True,
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["metrics-token"] == {
        "name": "metrics-token",
        "mountPath": "/etc/memspace/metrics",
        "readOnly": True,
    }
    assert Settings.from_env(
        {"MEMSPACE_METRICS_TOKEN_SECRET": "memspace-metrics-token"}
    ).metrics_token_secret == ("memspace-metrics-token")


def test_shard_pods_spread_as_the_settings_say_and_start_and_leave_quickly() -> None:
    plain = shards.pod_spec(Settings(), 0, [])
    assert "topologySpreadConstraints" not in plain
    assert "affinity" not in plain
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "X"}]
    anti: dict[str, object] = {
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}
    }
    settings = Settings.from_env(
        {
            "MEMSPACE_SERVER_TOPOLOGY_SPREAD": json.dumps(spread),
            "MEMSPACE_SERVER_AFFINITY": json.dumps(anti),
        }
    )
    spec = shards.pod_spec(settings, 3, [])
    (constraint,) = spec["topologySpreadConstraints"]
    # Without a selector of its own, a constraint counts every shard pod (not only shard 3's).
    assert constraint["labelSelector"] == {
        "matchLabels": {
            "app.kubernetes.io/name": "memspace",
            "app.kubernetes.io/component": "shard",
        }
    }
    assert spec["affinity"] == anti
    (container,) = spec["containers"]
    assert container["startupProbe"]["periodSeconds"] == 1
    assert container["readinessProbe"]["periodSeconds"] == 1
    # The startup probe waits on the health port for the server to serve (held Check), for up
    # to the startup limit in all.
    startup = container["startupProbe"]
    assert startup["timeoutSeconds"] * startup["failureThreshold"] == shards.STARTUP_LIMIT_S
    assert spec["enableServiceLinks"] is False


def test_a_static_volume_name_binds_the_claim_to_that_volume() -> None:
    space = models.parse(
        {
            "metadata": {"name": "pinned", "namespace": "team", "uid": "u", "generation": 1},
            "spec": {"storage": {"volumeName": "pv-1"}},
        }
    )
    manifest = volumes.manifest(Settings(storage_class="fast"), space, 0)
    assert manifest["spec"]["volumeName"] == "pv-1"
    assert manifest["spec"]["storageClassName"] == ""
