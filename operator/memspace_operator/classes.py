"""MemorySpaceClass: limits and defaults that the platform admin sets, like a StorageClass
(design section 9). A space names its class in `spec.className`, or gets the class annotated
`memspace.dev/is-default-class: "true"`; without either it is not limited.

`apply` turns a requested spec into the one the operator serves: each field the spec leaves
unset takes the class default, each numeric field above its limit is lowered to the limit
(min(spec, class)) and reported, so the space keeps serving at the class's limits with
Ready=False, reason ClassLimitExceeded. What cannot be lowered (the embedding dimension, a
StorageClass the class does not allow, a class the namespace may not use, a class that does
not exist) stops the space before anything is made: errors.ClassLimitError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from memspace_operator import errors, kube, models, naming

PLURAL = "memoryspaceclasses"
KIND = "MemorySpaceClass"
DEFAULT_ANNOTATION = "memspace.dev/is-default-class"
CACHE_S = 10.0
"""The classes are read with one LIST at most this often: a change to a class reaches its spaces
at their next check (the resync interval) plus at most this."""


@dataclasses.dataclass(frozen=True)
class Values:
    """One side of a class: its limits or its defaults (None: not set)."""

    hot_capacity: int | None = None
    storage_size: str | None = None
    storage_class: str | None = None
    max_memories: int | None = None
    max_writes_per_second: float | None = None
    max_recalls_per_second: float | None = None
    embedding_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class SpaceClass:
    name: str
    limits: Values = Values()
    defaults: Values = Values()
    allowed_storage_classes: tuple[str, ...] = ()
    allowed_namespaces: tuple[str, ...] = ()
    is_default: bool = False
    created: str = ""


def _values(doc: Mapping[str, Any]) -> Values:
    def number(key: str) -> float | None:
        value = doc.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    def integer(key: str) -> int | None:
        value = number(key)
        return int(value) if value is not None else None

    size = doc.get("storageSize")
    storage_class = doc.get("storageClassName")
    return Values(
        hot_capacity=integer("hotCapacity"),
        storage_size=str(size) if size else None,
        storage_class=str(storage_class) if storage_class else None,
        max_memories=integer("maxMemories"),
        max_writes_per_second=number("maxWritesPerSecond"),
        max_recalls_per_second=number("maxRecallsPerSecond"),
        embedding_dim=integer("embeddingDim"),
    )


def parse(body: Mapping[str, Any]) -> SpaceClass:
    metadata = body.get("metadata") or {}
    spec = body.get("spec") or {}
    annotations = metadata.get("annotations") or {}
    return SpaceClass(
        name=str(metadata.get("name", "")),
        limits=_values(spec.get("limits") or {}),
        defaults=_values(spec.get("defaults") or {}),
        allowed_storage_classes=tuple(str(c) for c in spec.get("allowedStorageClasses") or ()),
        allowed_namespaces=tuple(str(n) for n in spec.get("allowedNamespaces") or ()),
        is_default=annotations.get(DEFAULT_ANNOTATION) == "true",
        created=str(metadata.get("creationTimestamp", "")),
    )


def choose(found: Mapping[str, SpaceClass], name: str | None) -> SpaceClass | None:
    """The class a space of `className` `name` gets: that class (ClassLimitError when it does not
    exist), else the default class (the newest when several are marked), else None."""
    if name is not None:
        chosen = found.get(name)
        if chosen is None:
            raise errors.ClassLimitError(
                f"spec.className names MemorySpaceClass {name!r}, which does not exist; nothing "
                "is made until it does (kubectl get memoryspaceclasses lists them)",
                reason="ClassNotFound",
            )
        return chosen
    defaults = sorted(
        (c for c in found.values() if c.is_default), key=lambda c: (c.created, c.name)
    )
    return defaults[-1] if defaults else None


@dataclasses.dataclass(frozen=True)
class Applied:
    spec: models.SpaceSpec
    """The spec served: class defaults filled in, values above a limit lowered to it."""
    exceeded: tuple[str, ...] = ()
    """One sentence per field that asked for more than the class allows."""
    class_name: str | None = None


def _more(value: Any, limit: Any) -> bool:
    """Whether `value` is above `limit`: numbers, or quantities such as 10Gi."""
    if isinstance(value, str):
        return bool(models.quantity(value) > models.quantity(str(limit)))
    return bool(value > limit)


def apply(
    spec: models.SpaceSpec,
    chosen: SpaceClass | None,
    namespace: str,
    fallback_storage_class: str | None = None,
) -> Applied:
    """The spec to serve under `chosen` (see the module's docstring); `fallback_storage_class`
    is the operator's MEMSPACE_STORAGE_CLASS, used by a space that names none."""
    if chosen is None:
        return Applied(spec)
    name, limits, defaults = chosen.name, chosen.limits, chosen.defaults
    if chosen.allowed_namespaces and namespace not in chosen.allowed_namespaces:
        raise errors.ClassLimitError(f"class {name} may not be used in this namespace")
    if limits.embedding_dim is not None and spec.embedding_dim > limits.embedding_dim:
        raise errors.ClassLimitError(
            f"spec.embeddingDim {spec.embedding_dim} is above {limits.embedding_dim}, the limit "
            f"of class {name}; a dimension cannot be lowered, so the space is not served"
        )
    unset = spec.unset
    storage_class = spec.storage_class
    if "storageClassName" in unset and defaults.storage_class:
        storage_class = defaults.storage_class
    allowed = chosen.allowed_storage_classes
    effective_storage_class = storage_class or fallback_storage_class
    if allowed and (effective_storage_class or "") not in allowed:
        shown = effective_storage_class or "(the cluster's default)"
        raise errors.ClassLimitError(
            f"StorageClass {shown} is not one class {name} allows "
            f"({', '.join(allowed)}); set spec.storage.storageClassName to one of them"
        )

    exceeded: list[str] = []

    def served(key: str, field: str, given: Any, default: Any, limit: Any) -> Any:
        """The class default for an unset field, then min(value, limit); only a value the
        spec set itself is reported as exceeding (a built-in default is just lowered)."""
        explicit = key not in unset
        if not explicit and default is not None:
            given = default
        if limit is None:
            return given
        if given is None:
            # A spec silent on a quota takes the class's limit: it asks for nothing more.
            return limit
        if _more(given, limit):
            if explicit:
                exceeded.append(
                    f"{field} {given:g} is above {limit:g}, the limit of class {name}"
                    if not isinstance(given, str)
                    else f"{field} {given} is above {limit}, the limit of class {name}"
                )
            return limit
        return given

    quota = spec.quota
    hot = served(
        "hotCapacity",
        "spec.tiers.hotCapacity",
        spec.tiers.hot_capacity,
        defaults.hot_capacity,
        limits.hot_capacity,
    )
    size = served(
        "storageSize", "spec.storage.size", spec.size, defaults.storage_size, limits.storage_size
    )
    max_memories = served(
        "maxMemories",
        "spec.quota.maxMemories",
        quota.max_memories,
        defaults.max_memories,
        limits.max_memories,
    )
    writes = served(
        "maxWritesPerSecond",
        "spec.quota.maxWritesPerSecond",
        quota.max_writes_per_second,
        defaults.max_writes_per_second,
        limits.max_writes_per_second,
    )
    recalls = served(
        "maxRecallsPerSecond",
        "spec.quota.maxRecallsPerSecond",
        quota.max_recalls_per_second,
        defaults.max_recalls_per_second,
        limits.max_recalls_per_second,
    )
    result = dataclasses.replace(
        spec,
        size=str(size),
        storage_class=storage_class,
        tiers=dataclasses.replace(spec.tiers, hot_capacity=int(hot)),
        quota=dataclasses.replace(
            quota,
            max_memories=int(max_memories) if max_memories is not None else None,
            max_writes_per_second=writes,
            max_recalls_per_second=recalls,
        ),
    )
    return Applied(result, tuple(exceeded), name)


class Catalog:
    """The MemorySpaceClasses, read with one LIST at most every CACHE_S seconds."""

    def __init__(
        self, client: kube.Kube, fallback_storage_class: str | None, ttl_s: float = CACHE_S
    ) -> None:
        self._kube = client
        self._fallback_storage_class = fallback_storage_class
        self._ttl_s = ttl_s
        self._found: dict[str, SpaceClass] = {}
        self._read_at: float | None = None
        self._reading = asyncio.Lock()

    async def classes(self) -> dict[str, SpaceClass]:
        # One LIST at a time: the reconciles that start while it is in flight wait for it
        # (each made its own when 10,000 spaces came at once: a LIST per space).
        async with self._reading:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= self._ttl_s:
                url = kube.path(naming.GROUP, naming.VERSION, PLURAL)
                try:
                    listed = await self._kube.list(url)
                except errors.NotFoundError:
                    listed = {}  # the class CRD is not installed: no class limits anything
                items = listed.get("items") or []
                self._found = {c.name: c for c in (parse(item) for item in items)}
                self._read_at = now
        return self._found

    async def apply(self, space: models.MemorySpace) -> Applied:
        chosen = choose(await self.classes(), space.spec.class_name)
        return apply(space.spec, chosen, space.ref.namespace, self._fallback_storage_class)
