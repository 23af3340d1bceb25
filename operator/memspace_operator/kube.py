"""A small asyncio client of the Kubernetes API for the operator's own reads and writes: JSON in,
JSON out, typed errors (memspace_operator.errors), explicit patch types, list and watch.

kopf talks to the API for its own bookkeeping; everything the operator makes goes through one
`Kube`, created in the startup handler and closed in the cleanup handler. Credentials come from
the kubernetes package's loaders: in cluster (the pod's ServiceAccount, refreshed as the token
rotates), else the kubeconfig ($KUBECONFIG or ~/.kube/config).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, Literal

import aiohttp
import kubernetes.client
import kubernetes.config

from memspace_operator import errors

log = logging.getLogger(__name__)

Json = dict[str, Any]
PatchType = Literal["merge", "strategic", "json"]
_CONTENT_TYPES: dict[PatchType, str] = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
}
RETRIES = (0.2, 0.5, 1.0)
"""Pauses between attempts of one request after a connection error, 429 or 5xx."""
REQUEST_TIMEOUT_S = 30.0
WATCH_TIMEOUT_S = 290


def path(
    group: str,
    version: str,
    resource: str,
    *,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The URL path of a collection or an object: group "" is the core API."""
    parts = ["/api/v1"] if not group else [f"/apis/{group}/{version}"]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(resource)
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


def pvcs(namespace: str, name: str | None = None) -> str:
    return path("", "v1", "persistentvolumeclaims", namespace=namespace, name=name)


def secrets(namespace: str, name: str | None = None) -> str:
    return path("", "v1", "secrets", namespace=namespace, name=name)


def services(namespace: str, name: str | None = None) -> str:
    return path("", "v1", "services", namespace=namespace, name=name)


def statefulsets(namespace: str, name: str | None = None) -> str:
    return path("apps", "v1", "statefulsets", namespace=namespace, name=name)


def leases(namespace: str, name: str | None = None) -> str:
    return path("coordination.k8s.io", "v1", "leases", namespace=namespace, name=name)


def memoryspaces(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    return path(
        "memspace.dev",
        "v1alpha1",
        "memoryspaces",
        namespace=namespace,
        name=name,
        subresource=subresource,
    )


def memoryspacebackups(
    namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    """MemorySpaceBackups of a namespace (None: of every namespace)."""
    return path(
        "memspace.dev",
        "v1alpha1",
        "memoryspacebackups",
        namespace=namespace,
        name=name,
        subresource=subresource,
    )


def backuptargets(name: str | None = None) -> str:
    """MemorySpaceBackupTargets (cluster-scoped)."""
    return path("memspace.dev", "v1alpha1", "memoryspacebackuptargets", name=name)


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster credentials, else the kubeconfig; the same order as kopf's own login."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (kubernetes.config.ConfigException, OSError) as err:
            raise errors.PermanentError(
                f"no Kubernetes credentials: not in a cluster and no usable kubeconfig ({err})"
            ) from err
    return configuration


def _ssl_context(configuration: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if configuration.cert_file and configuration.key_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Kube:
    """One connection pool to the API server. Use `await Kube.open()`; `await kube.close()`."""

    def __init__(
        self,
        server: str,
        session: aiohttp.ClientSession,
        authorization: Callable[[], str | None],
        concurrency: int,
    ) -> None:
        self.server = server.rstrip("/")
        self._session = session
        self._authorization = authorization
        self._slots = asyncio.Semaphore(concurrency)
        self.waiting = 0
        """Requests waiting for a slot: the API server is the bottleneck while there are any."""
        self.requests: Counter[str] = Counter()
        """Requests sent, by HTTP method (dry runs counted as DRYRUN)."""

    @classmethod
    async def open(
        cls, concurrency: int = 32, configuration: kubernetes.client.Configuration | None = None
    ) -> Kube:
        config: Any = configuration or load_configuration()
        connector = aiohttp.TCPConnector(ssl=_ssl_context(config), limit=concurrency + 8)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=10)
        )

        def authorization() -> str | None:
            value: str | None = config.get_api_key_with_prefix("BearerToken", alias="authorization")
            return value

        return cls(config.host, session, authorization, concurrency)

    async def close(self) -> None:
        await self._session.close()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._authorization()
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        url_path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        attempt_s: float = REQUEST_TIMEOUT_S,
    ) -> Any:
        """One request; retried briefly on connection errors, 429 and 5xx. Returns the decoded
        JSON answer; raises errors.ApiError (or a subclass) for any other failure. `attempt_s`
        bounds each attempt (seconds)."""
        data = None if body is None else json.dumps(body)
        dry_run = bool(params and params.get("dryRun"))
        self.requests["DRYRUN" if dry_run else method] += 1
        failure: errors.ApiError | None = None
        for pause in (*RETRIES, None):
            try:
                async with (
                    self._slot(),
                    self._session.request(
                        method,
                        self.server + url_path,
                        params=params,
                        data=data,
                        headers=self._headers(content_type if data is not None else None),
                        timeout=aiohttp.ClientTimeout(total=attempt_s),
                    ) as response,
                ):
                    text = await response.text()
                    answer: Any = json.loads(text) if text else None
                    if response.status < 400:
                        return answer
                    failure = errors.api_error(response.status, answer)
                    if response.status != 429 and response.status < 500:
                        raise failure
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                failure = errors.ApiError(0, "Unavailable", f"{method} {url_path}: {err!r}")
            if pause is None:
                break
            await asyncio.sleep(pause)
        assert failure is not None
        raise failure

    @property
    def busy(self) -> bool:
        """Whether requests queue for a slot (the API server answers slower than asked)."""
        return self.waiting > 0

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def get(self, url_path: str) -> Json:
        answer: Json = await self.request("GET", url_path)
        return answer

    async def get_or_none(self, url_path: str) -> Json | None:
        try:
            return await self.get(url_path)
        except errors.NotFoundError:
            return None

    async def list(self, url_path: str, label_selector: str | None = None) -> Json:
        params = {"labelSelector": label_selector} if label_selector else None
        answer: Json = await self.request("GET", url_path, params=params)
        return answer

    async def create(self, url_path: str, body: Json, *, dry_run: bool = False) -> Json:
        params = {"dryRun": "All"} if dry_run else None
        answer: Json = await self.request("POST", url_path, params=params, body=body)
        return answer

    async def replace(
        self, url_path: str, body: Json, *, attempt_s: float = REQUEST_TIMEOUT_S
    ) -> Json:
        """PUT the whole object; with `metadata.resourceVersion` set, ConflictError when the
        object changed since it was read (optimistic concurrency)."""
        answer: Json = await self.request("PUT", url_path, body=body, attempt_s=attempt_s)
        return answer

    async def patch(self, url_path: str, body: Any, kind: PatchType = "merge") -> Json:
        answer: Json = await self.request(
            "PATCH", url_path, body=body, content_type=_CONTENT_TYPES[kind]
        )
        return answer

    async def delete(
        self, url_path: str, *, missing_ok: bool = True, uid: str | None = None
    ) -> bool:
        """Delete an object in the background; False when it was not there (and missing_ok).
        With `uid`, only that very object: another of the same name is a ConflictError."""
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", url_path, body=body)
        except errors.NotFoundError:
            if not missing_ok:
                raise
            return False
        return True

    async def watch(
        self, url_path: str, resource_version: str, label_selector: str | None = None
    ) -> AsyncGenerator[tuple[str, Json], None]:
        """Events (type, object) of a collection after `resource_version`, until the server ends
        the stream; errors.GoneError when that version is too old (list again)."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        self.requests["WATCH"] += 1
        try:
            async with self._session.get(
                self.server + url_path,
                params=params,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=WATCH_TIMEOUT_S + 30, connect=10),
            ) as response:
                if response.status >= 400:
                    text = await response.text()
                    answer = None
                    with contextlib.suppress(ValueError):
                        answer = json.loads(text)
                    raise errors.api_error(response.status, answer or text)
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, obj = event.get("type", ""), event.get("object") or {}
                        if kind == "ERROR":
                            raise errors.api_error(int(obj.get("code") or 500), obj)
                        yield kind, obj
        except (aiohttp.ClientError, TimeoutError) as err:
            raise errors.ApiError(0, "Unavailable", f"watch {url_path}: {err!r}") from err


def selector(labels: Mapping[str, str]) -> str:
    """A label selector string matching every one of `labels`."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def pods(namespace: str, name: str | None = None) -> str:
    return path("", "v1", "pods", namespace=namespace, name=name)
