"""The operator's settings: one typed object, loaded once from the environment in `main` (or in
the startup handler when kopf runs the handlers module itself) and passed down.

The environment variables are a contract with the Helm chart (design section 3): each field is
declared once (memspace_contract.settings) with its variable, bounds and help text; a value that
cannot be used stops the operator at start-up with a message naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic

from memspace_contract import models
from memspace_contract.settings import Settings as _Base
from memspace_contract.settings import SettingsError, setting

__all__ = ["DEFAULT_ENDPOINT_TEMPLATE", "Settings", "SettingsError"]

DEFAULT_ENDPOINT_TEMPLATE = "memspace-shard-{shard}.{namespace}.svc:50051"
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


class Settings(_Base):
    server_namespace: str = setting(
        "memspace-system",
        env="MEMSPACE_SERVER_NAMESPACE",
        help="namespace of the server shards, their index Secrets and every space's PVC",
    )
    server_image: str = setting(
        "ghcr.io/memspace/memspace:0.1.0",
        env="MEMSPACE_SERVER_IMAGE",
        help="image of the shard pods (`memspace serve`)",
    )
    storage_class: str | None = setting(
        None,
        env="MEMSPACE_STORAGE_CLASS",
        help="StorageClass of spaces that name none; unset: the cluster's default class",
    )
    backup_default_target: str | None = setting(
        None,
        env="MEMSPACE_BACKUP_DEFAULT_TARGET",
        help="MemorySpaceBackupTarget of backups, schedules and offloads that name none; unset: "
        'the target annotated memspace.dev/is-default-target "true"',
    )
    backup_schedule_interval_s: float = setting(
        30.0,
        env="MEMSPACE_BACKUP_SCHEDULE_INTERVAL",
        gt=0,
        help="seconds between checks of the spaces' backup schedules (a scheduled backup starts "
        "at most this late; retention is applied as often)",
    )
    backup_attempts: int = setting(
        6,
        env="MEMSPACE_BACKUP_ATTEMPTS",
        ge=1,
        help="attempts of a backup whose shard answers UNAVAILABLE and the like (the store or the "
        "shard away) before it is Failed; the delays between them double from 10 s",
    )
    max_spaces_per_shard: int = setting(
        20,
        env="MEMSPACE_MAX_SPACES_PER_SHARD",
        ge=1,
        help="spaces (volumes) per shard; nodes attach a limited number of block volumes",
    )
    max_shards: int = setting(
        50,
        env="MEMSPACE_MAX_SHARDS",
        ge=1,
        help="most shards the operator creates; past that new spaces get Ready=False ShardsFull",
    )
    mount_batch_window_s: float = setting(
        10.0,
        env="MEMSPACE_MOUNT_BATCH_WINDOW",
        gt=0,
        help="seconds: at most one pod-template change (one restart) per shard in this window; "
        "mount changes that arrive meanwhile are applied together",
    )
    shard_intake_window_s: float = setting(
        600.0,
        env="MEMSPACE_SHARD_INTAKE_WINDOW",
        gt=0,
        help="seconds a new shard takes new spaces (each batch restarts it) before it is sealed "
        "(it is sealed earlier when full); a sealed shard is never restarted by spaces coming "
        "or going. Shorter: tenants are bounced for less long, more shards hold fewer spaces",
    )
    server_topology_spread: list[dict[str, Any]] = setting(
        env="MEMSPACE_SERVER_TOPOLOGY_SPREAD",
        factory=list,
        help="JSON list of the shard pods' topologySpreadConstraints (a constraint without a "
        "labelSelector counts every shard pod); empty: none",
    )
    server_affinity: dict[str, Any] = setting(
        env="MEMSPACE_SERVER_AFFINITY",
        factory=dict,
        help="JSON object of the shard pods' affinity (podAntiAffinity, say); empty: none",
    )
    health_interval_s: float = setting(
        30.0,
        env="MEMSPACE_HEALTH_INTERVAL",
        gt=0,
        help="seconds between Health RPCs to each shard (one call covers all its spaces)",
    )
    resync_interval_s: float = setting(
        300.0,
        env="MEMSPACE_RESYNC_INTERVAL",
        gt=0,
        help="seconds between level-based re-checks of every space's children (drift repair, "
        "retries of SpaceIdConflict and ShardsFull); reads only when nothing drifted",
    )
    admin_token_file: Path | None = setting(
        None,
        env="MEMSPACE_ADMIN_TOKEN_FILE",
        help="file holding the shards' admin token, for Health RPCs; unset: no health polling "
        "(Healthy stays Unknown)",
    )
    admin_token_secret: str = setting(
        "memspace-admin-token",
        env="MEMSPACE_ADMIN_TOKEN_SECRET",
        help="Secret (key `token`) in the server namespace that the shard pods mount as their "
        "admin token; the chart creates it",
    )
    metrics_token_secret: str | None = setting(
        None,
        env="MEMSPACE_METRICS_TOKEN_SECRET",
        help="Secret (key `token`) in the server namespace whose token the shards' metrics port "
        "requires as `Authorization: Bearer` (`memspace serve --metrics-token-file`); the chart "
        "creates it. Unset: the metrics port answers anyone who reaches it",
    )
    shard_endpoint_template: str = setting(
        DEFAULT_ENDPOINT_TEMPLATE,
        env="MEMSPACE_SHARD_ENDPOINT_TEMPLATE",
        help="host:port of shard N, with {shard} and {namespace} (Python format fields); an "
        "operator run outside the cluster points it at loopback ports",
    )
    server_resources: dict[str, Any] = setting(
        env="MEMSPACE_SERVER_RESOURCES",
        factory=dict,
        help="JSON object of the shard container's `resources` (requests and limits)",
    )
    server_env: dict[str, str] = setting(
        env="MEMSPACE_SERVER_ENV",
        factory=dict,
        help="JSON object of environment variables of the shard container, e.g. the OTEL_* "
        "variables that turn tracing on (the chart's tracing.env)",
    )
    embedding_models: str = setting(
        ",".join(models.MODELS),
        env="MEMSPACE_EMBEDDING_MODELS",
        help="the embedding models the platform offers (the chart's server.embedding.models, "
        "comma-separated, or 'none'; the shards get the same list): a MemorySpace naming "
        "another in spec.embedding.model is not served (Ready=False, InvalidSpec)",
    )
    service_account: str | None = setting(
        None,
        env="MEMSPACE_SERVER_SERVICE_ACCOUNT",
        help="ServiceAccount of the shard pods; unset: the namespace's default (the shards never "
        "talk to the Kubernetes API, so no token is mounted either way)",
    )
    tls_enabled: bool = setting(
        True,
        env="MEMSPACE_TLS_ENABLED",
        help="shards serve gRPC over TLS; tenants' credentials Secrets get `ca.crt` and the "
        "health checks verify the shards against it. false: plaintext (shards run with "
        "--insecure)",
    )
    tls_secret: str | None = setting(
        None,
        env="MEMSPACE_TLS_SECRET",
        help="Secret in the server namespace (tls.crt, tls.key, ca.crt) that every shard serves "
        "with, made by cert-manager; unset: the operator's own CA issues one per shard",
    )
    tls_client_auth: bool = setting(
        False,
        env="MEMSPACE_TLS_CLIENT_AUTH",
        help="mutual TLS: shards accept only clients with a certificate of the operator's CA; "
        "each credentials Secret gets one (tls.crt, tls.key) and the health checks present "
        "one of their own. Needs the operator's own CA (no MEMSPACE_TLS_SECRET)",
    )
    tls_ca_secret: str = setting(
        "memspace-ca",
        env="MEMSPACE_TLS_CA_SECRET",
        help="Secret in the server namespace holding the operator's CA (current and next)",
    )
    tls_ca_days: float = setting(
        3650.0,
        env="MEMSPACE_TLS_CA_DAYS",
        gt=0,
        help="lifetime of the operator's CA certificates (days); the next CA takes over when a "
        "third of the current one's lifetime is left",
    )
    tls_cert_days: float = setting(
        90.0,
        env="MEMSPACE_TLS_CERT_DAYS",
        gt=0,
        help="lifetime of the shard certificates the operator issues (days); renewed when a "
        "third is left",
    )
    tls_check_interval_s: float = setting(
        3600.0,
        env="MEMSPACE_TLS_CHECK_INTERVAL",
        gt=0,
        help="seconds between checks of the CA and the shard certificates for renewal",
    )
    cluster_domain: str = setting(
        "cluster.local",
        env="MEMSPACE_CLUSTER_DOMAIN",
        help="the cluster's DNS domain, for the shard certificates' fully qualified names",
    )
    api_concurrency: int = setting(
        32,
        env="MEMSPACE_API_CONCURRENCY",
        ge=1,
        help="most Kubernetes API requests in flight at once (keeps 1,000 spaces applied at "
        "once from flooding the API server)",
    )

    leader_election: bool = setting(
        True,
        env="MEMSPACE_LEADER_ELECTION",
        help="elect one leader among the operator's replicas on a coordination.k8s.io Lease in "
        "the server namespace; the others stand by. false: this process leads at once (one "
        "replica only, never two)",
    )
    lease_name: str = setting(
        "memspace-operator",
        env="MEMSPACE_LEASE_NAME",
        help="name of the leader election's Lease, in the server namespace",
    )
    lease_duration_s: int = setting(
        15,
        env="MEMSPACE_LEASE_DURATION",
        ge=2,
        help="seconds (whole: the Lease's leaseDurationSeconds) a standby waits after the "
        "leader's last renewal before it takes over: how long a crashed leader leaves the "
        "spaces unreconciled",
    )
    lease_renew_deadline_s: float = setting(
        10.0,
        env="MEMSPACE_LEASE_RENEW_DEADLINE",
        gt=0,
        help="seconds after its last renewal at which a leader that cannot renew stops (and "
        "exits); shorter than the lease duration, so it has stopped before a standby takes over",
    )
    lease_retry_period_s: float = setting(
        2.0,
        env="MEMSPACE_LEASE_RETRY_PERIOD",
        gt=0,
        help="seconds between the leader's renewals and between a standby's reads of the Lease",
    )

    @pydantic.field_validator("server_namespace")
    @classmethod
    def _namespace_name(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value) or len(value) > 63:
            raise ValueError("not a namespace name")
        return value

    @pydantic.field_validator("shard_endpoint_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        try:
            value.format(shard=0, namespace="memspace-system")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{err!r}; only {{shard}} and {{namespace}} may be used") from err
        return value

    @pydantic.field_validator("embedding_models")
    @classmethod
    def _known_models(cls, value: str) -> str:
        for name in models.offered(value):
            if name not in models.MODELS:
                raise ValueError(
                    f"{name!r} is not a model memspace knows ({', '.join(models.MODELS)})"
                )
        return value

    @pydantic.field_validator("lease_name")
    @classmethod
    def _lease_name(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value) or len(value) > 63:
            raise ValueError("not a Lease name (lower-case letters, digits and '-')")
        return value

    @pydantic.model_validator(mode="after")
    def _lease_timing(self) -> Settings:
        if not (self.lease_retry_period_s < self.lease_renew_deadline_s < self.lease_duration_s):
            raise ValueError(
                "MEMSPACE_LEASE_RETRY_PERIOD < MEMSPACE_LEASE_RENEW_DEADLINE < "
                "MEMSPACE_LEASE_DURATION must hold: a leader stops before a standby may take over"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _client_auth_needs_the_operator_ca(self) -> Settings:
        if self.tls_client_auth and (not self.tls_enabled or self.tls_secret is not None):
            raise ValueError(
                "MEMSPACE_TLS_CLIENT_AUTH needs TLS with the operator's own CA "
                "(MEMSPACE_TLS_ENABLED true, MEMSPACE_TLS_SECRET unset): it issues the clients' "
                "certificates"
            )
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from MEMSPACE_* variables over the defaults; SettingsError names a bad one."""
        return cls.load(environ)

    def shard_server_name(self, shard: int) -> str:
        """The name a shard's certificate is checked for: its Service's, whatever address
        `endpoint` dials (a loopback port when the operator runs outside the cluster)."""
        return f"memspace-shard-{shard}.{self.server_namespace}.svc"

    @property
    def offered_models(self) -> tuple[str, ...]:
        return models.offered(self.embedding_models)

    def endpoint(self, shard: int) -> str:
        """host:port of shard N: what clients and the health poller dial."""
        return self.shard_endpoint_template.format(shard=shard, namespace=self.server_namespace)
