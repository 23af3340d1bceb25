"""Space selection and auth: which space a call names and whether its token opens it.

Every RPC of memspace.v1 has a policy in POLICIES (a test checks none is missing), and
`handling` applies `Router.route` to every call before its servicer runs, so no handler selects
a space or checks a token by itself.

Space selection (design section 5): metadata `x-memory-space` when present and non-empty, else
the request's `space` field (an empty header with an empty field is INVALID_ARGUMENT).
Both present and different: INVALID_ARGUMENT. Neither: the `default` space where the server
allows it (standalone), else INVALID_ARGUMENT. A malformed ID is INVALID_ARGUMENT, never a
fallback to `default`.

Auth, when the server checks tokens (managed mode, or standalone with an admin token): metadata
`authorization: Bearer <token>`. A space's token opens that space (MemoryService and its Health);
the admin token opens SpaceService, and MemoryService of spaces without a token of their own. A
token that does not open the named space gets PERMISSION_DENIED whether or not the space exists.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence

from memspace_contract import index, spaces, wire
from memspace_server import errors

SPACE_KEY = wire.SPACE_KEY
PARSED_KEPT = 4096
"""Valid space IDs a router remembers having parsed (then it starts over)."""


class Scope(enum.Enum):
    """How many spaces a call is about."""

    SPACE = "one space; the default one where the server has it"
    NAMED_SPACE = "one space, named explicitly"
    SPACE_OR_ALL = "one space, or every space when none is named"
    NO_SPACE = "no particular space"


class Access(enum.Enum):
    """Which token opens a call."""

    TENANT = "the space's token (the admin token for a space without a token)"
    ADMIN = "the admin token"
    TENANT_OR_ADMIN = "the space's token or the admin token; the admin token for every space"


@dataclasses.dataclass(frozen=True)
class Policy:
    scope: Scope
    access: Access


_MEMORY = Policy(Scope.SPACE, Access.TENANT)

POLICIES: dict[str, Policy] = {
    "/memspace.v1.MemoryService/Remember": _MEMORY,
    "/memspace.v1.MemoryService/RememberBatch": _MEMORY,
    "/memspace.v1.MemoryService/Recall": _MEMORY,
    "/memspace.v1.MemoryService/Get": _MEMORY,
    "/memspace.v1.MemoryService/Forget": _MEMORY,
    "/memspace.v1.MemoryService/Subscribe": _MEMORY,
    "/memspace.v1.MemoryService/Consolidate": _MEMORY,
    "/memspace.v1.SpaceService/CreateSpace": Policy(Scope.NAMED_SPACE, Access.ADMIN),
    "/memspace.v1.SpaceService/DeleteSpace": Policy(Scope.NAMED_SPACE, Access.ADMIN),
    "/memspace.v1.SpaceService/ListSpaces": Policy(Scope.NO_SPACE, Access.ADMIN),
    "/memspace.v1.SpaceService/Health": Policy(Scope.SPACE_OR_ALL, Access.TENANT_OR_ADMIN),
    "/memspace.v1.SpaceService/ApplyIndexEntry": Policy(Scope.NAMED_SPACE, Access.ADMIN),
    "/memspace.v1.SpaceService/BackupSpace": Policy(Scope.NAMED_SPACE, Access.ADMIN),
    "/memspace.v1.SpaceService/RestoreSpace": Policy(Scope.NAMED_SPACE, Access.ADMIN),
    "/memspace.v1.SpaceService/DeleteBackup": Policy(Scope.NAMED_SPACE, Access.ADMIN),
}


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a call goes, decided once at the edge."""

    space: spaces.SpaceId | None
    """The space the call is about; None only for NO_SPACE calls and Health of every space."""
    admin: bool
    """The call was opened by the admin token."""
    entry: index.IndexEntry | None = None
    """The space's index entry when the call arrived (None: not in the index). Looked up once,
    it serves auth, loading the space and the call's metric label."""

    def require_space(self) -> spaces.SpaceId:
        if self.space is None:
            raise AssertionError("this call's policy always names a space")
        return self.space


class Router:
    def __init__(
        self,
        lookup: Callable[[spaces.SpaceId], index.IndexEntry | None],
        allow_default: bool,
        check_tokens: bool,
    ) -> None:
        self._lookup = lookup
        self.allow_default = allow_default
        self.check_tokens = check_tokens
        self._admin_sha256: str | None = None
        self._parsed: dict[str, spaces.SpaceId] = {}
        """Space IDs seen valid (at most PARSED_KEPT): most calls name a space named before."""

    def set_admin_token(self, token: str | None) -> None:
        self._admin_sha256 = index.token_sha256(token) if token else None

    # -- space selection -----------------------------------------------------------------------

    def select(
        self, scope: Scope, named_in_metadata: Sequence[str], named_in_request: str
    ) -> spaces.SpaceId | None:
        if scope is Scope.NO_SPACE:
            return None
        if len(set(named_in_metadata)) > 1:
            raise errors.InvalidArgumentError(
                f"metadata {SPACE_KEY} names {len(set(named_in_metadata))} different spaces; "
                "give exactly one"
            )
        header = named_in_metadata[0] if named_in_metadata else None
        if header == "":
            # Metadata wins only when present and non-empty: an empty header defers to the
            # request's field, and names no space by itself (never the default one).
            if not named_in_request:
                raise errors.InvalidSpaceIdError(
                    f"metadata {SPACE_KEY} is empty and the request's space field too: name a "
                    "space in one of them (a space ID is 3 to 63 characters of a-z, 0-9 and '-')"
                )
            header = None
        if header is not None and named_in_request and header != named_in_request:
            raise errors.InvalidArgumentError(
                f"metadata {SPACE_KEY} names space {header[:80]!r} but the request's space "
                f"field names {named_in_request[:80]!r}; give one of them, or the same in both"
            )
        name = header if header is not None else named_in_request or None
        if name is None:
            if scope is Scope.SPACE_OR_ALL:
                return None
            if scope is Scope.SPACE and self.allow_default:
                return spaces.DEFAULT_SPACE
            extra = "" if scope is Scope.NAMED_SPACE else " (this server has no default space)"
            raise errors.InvalidArgumentError(
                f"no space named: set metadata {SPACE_KEY} or the request's space field{extra}"
            )
        known = self._parsed.get(name)
        if known is not None:
            return known
        space = parse(name)
        if len(self._parsed) >= PARSED_KEPT:
            self._parsed.clear()
        self._parsed[name] = space
        return space

    # -- auth ----------------------------------------------------------------------------------

    def authorize(
        self,
        access: Access,
        space: spaces.SpaceId | None,
        entry: index.IndexEntry | None,
        authorization: Sequence[str],
    ) -> bool:
        """Check the call's token against `space` (whose index entry is `entry`); return
        whether it is the admin token."""
        if not self.check_tokens:
            return False
        digest = index.token_sha256(bearer_token(authorization))
        admin = index.token_opens(digest, self._admin_sha256)
        own = entry is not None and index.token_opens(digest, entry.token_sha256)
        if access is Access.ADMIN:
            allowed = admin
        elif access is Access.TENANT_OR_ADMIN:
            allowed = admin or own
        else:
            # The admin token reads no tenant's data, but it may use a space without a token of
            # its own, and it learns that a space does not exist (it can list them anyway).
            allowed = own or (admin and (entry is None or entry.token_sha256 is None))
        if not allowed:
            raise errors.PermissionDeniedError(_denial(access, space))
        return admin

    def known_space(
        self, policy: Policy, named_in_metadata: Sequence[str], named_in_request: str
    ) -> spaces.SpaceId | None:
        """The space a call names when it is in the index (None: it names none, a malformed
        one or one not in the index); for counting a refused call."""
        try:
            space = self.select(policy.scope, named_in_metadata, named_in_request)
        except errors.MemspaceError:
            return None
        if space is None or self._lookup(space) is None:
            return None
        return space

    def route(
        self,
        policy: Policy,
        named_in_metadata: Sequence[str],
        named_in_request: str,
        authorization: Sequence[str],
    ) -> Route:
        space = self.select(policy.scope, named_in_metadata, named_in_request)
        entry = self._lookup(space) if space is not None else None
        admin = self.authorize(policy.access, space, entry, authorization)
        return Route(space=space, admin=admin, entry=entry)


def parse(name: str) -> spaces.SpaceId:
    try:
        return spaces.parse_space_id(name)
    except spaces.InvalidSpaceIdError as err:
        raise errors.InvalidSpaceIdError(str(err)) from err


def bearer_token(authorization: Sequence[str]) -> str:
    if not authorization:
        raise errors.UnauthenticatedError(
            "this server needs a token: set metadata 'authorization: Bearer <token>'"
        )
    if len(authorization) > 1:
        raise errors.UnauthenticatedError("give one authorization header, not several")
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise errors.UnauthenticatedError(
            "the authorization header must be 'Bearer <token>' (the token from the space's "
            "credentials Secret, key 'token')"
        )
    return token


def _denial(access: Access, space: spaces.SpaceId | None) -> str:
    if access is Access.ADMIN:
        return "this call needs the admin token; a space's token opens only that space"
    if space is None:
        return "Health of every space needs the admin token; name a space to use its token"
    return f"the token does not open space {space!r}; each space's token opens that space only"
