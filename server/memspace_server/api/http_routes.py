"""The HTTP/JSON routes of memspace.v1: one `Operation` per gRPC method, naming its HTTP verb and
path, which request fields come from the path or the query, and which from the JSON body.

Both the HTTP front (`http_app`) and the OpenAPI document (`openapi`) are built from this one
table, and a test checks that it lists every method of every memspace.v1 service exactly once.
"""

from __future__ import annotations

import dataclasses
import enum


class Body(enum.Enum):
    NONE = "none"
    """No body: every field comes from the path or the query."""
    FIELDS = "fields"
    """A JSON object of the request's fields other than those in the path (may be absent)."""
    MEMORY = "memory"
    """The request's `memory` field, a Memory object, is the body."""
    MEMORIES = "memories"
    """`{"memories": [Memory, ...]}`: one request of a client stream per memory."""


@dataclasses.dataclass(frozen=True)
class Operation:
    verb: str
    path: str
    """An OpenAPI path template; `{name}` fills the request field `name`."""
    service: str
    method: str
    body: Body
    summary: str
    query: tuple[str, ...] = ()
    """Request fields read from the query string."""
    events: bool = False
    """Answered as Server-Sent Events (a server stream)."""

    @property
    def operation_id(self) -> str:
        return f"{self.service}.{self.method}"

    @property
    def path_fields(self) -> tuple[str, ...]:
        parts = [part for part in self.path.split("/") if part.startswith("{")]
        return tuple(part.strip("{}") for part in parts)

    @property
    def starlette_path(self) -> str:
        """The path for Starlette's router: a memory id may hold '/' (sent as %2F)."""
        return self.path.replace("{id}", "{id:path}")


SPACES = "/v1/spaces"
SPACE = "/v1/spaces/{space}"

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        f"{SPACE}/memories",
        "MemoryService",
        "Remember",
        Body.MEMORY,
        "Store one memory; answered once it is in the space's WAL and fsynced",
    ),
    Operation(
        "POST",
        f"{SPACE}/memories/batch",
        "MemoryService",
        "RememberBatch",
        Body.MEMORIES,
        "Store many memories, all or none, with one fsync",
    ),
    Operation(
        "POST",
        f"{SPACE}/recall",
        "MemoryService",
        "Recall",
        Body.FIELDS,
        "The top k memories of every tier by cosine similarity to a cue (mode "
        "RECALL_MODE_VECTOR, the default), by BM25 of a text query over content and tags "
        "(RECALL_MODE_KEYWORD), or both fused by reciprocal rank (RECALL_MODE_HYBRID)",
    ),
    Operation(
        "GET", f"{SPACE}/memories/{{id}}", "MemoryService", "Get", Body.NONE, "One memory by id"
    ),
    Operation(
        "DELETE",
        f"{SPACE}/memories/{{id}}",
        "MemoryService",
        "Forget",
        Body.NONE,
        "Remove one memory; an unknown id answers forgotten=false",
    ),
    Operation(
        "GET",
        f"{SPACE}/events",
        "MemoryService",
        "Subscribe",
        Body.NONE,
        "The space's change feed as Server-Sent Events whose ids are LSNs: replay from "
        "since_lsn (or after Last-Event-ID), then live",
        query=("since_lsn",),
        events=True,
    ),
    Operation(
        "POST",
        f"{SPACE}/consolidate",
        "MemoryService",
        "Consolidate",
        Body.NONE,
        "Move the space's WAL-backed state into its tiers now",
    ),
    Operation(
        "PUT",
        SPACE,
        "SpaceService",
        "CreateSpace",
        Body.FIELDS,
        "Create a space (standalone servers only); the same settings again succeed",
    ),
    Operation(
        "DELETE",
        SPACE,
        "SpaceService",
        "DeleteSpace",
        Body.NONE,
        "Delete a space and its data (standalone servers only)",
    ),
    Operation("GET", SPACES, "SpaceService", "ListSpaces", Body.NONE, "Every space of the server"),
    Operation(
        "GET",
        f"{SPACE}/health",
        "SpaceService",
        "Health",
        Body.NONE,
        "Health of one space (its own token or the admin token)",
    ),
    Operation(
        "POST",
        f"{SPACE}/index-entry",
        "SpaceService",
        "ApplyIndexEntry",
        Body.FIELDS,
        "Apply one spaces index entry at once (admin only; the operator's call)",
    ),
    Operation(
        "POST",
        f"{SPACE}/backups",
        "SpaceService",
        "BackupSpace",
        Body.FIELDS,
        "Back up the space to an object-store target (admin only)",
    ),
    Operation(
        "POST",
        f"{SPACE}/restore",
        "SpaceService",
        "RestoreSpace",
        Body.FIELDS,
        "Fill the space's empty volume from a backup (admin only)",
    ),
    Operation(
        "DELETE",
        f"{SPACE}/backups/{{backup_id}}",
        "SpaceService",
        "DeleteBackup",
        Body.FIELDS,
        "Delete one backup of the space from a target (admin only)",
    ),
)

HEALTH_OF_EVERY_SPACE = Operation(
    "GET",
    "/v1/health",
    "SpaceService",
    "Health",
    Body.NONE,
    "Health of the server and every space (admin token), or of the space X-Memory-Space names",
)
"""Health without a space in the path: the second route of one method."""

ROUTES: tuple[Operation, ...] = (*OPERATIONS, HEALTH_OF_EVERY_SPACE)
