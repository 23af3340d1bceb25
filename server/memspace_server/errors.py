"""Errors of the memspace server, defined once, with no transport imports. The gRPC layer maps
each class to one status code in a single table.

    MemspaceError
    ├── InvalidArgumentError          a request that can never succeed as sent
    │   ├── InvalidSpaceIdError
    │   └── InvalidMemoryError        wrong embedding size, NaN, oversized content, bad tags, ...
    ├── UnauthenticatedError          no token where one is needed
    ├── PermissionDeniedError         a token that does not open the named space
    ├── NotFoundError
    │   ├── SpaceNotFoundError
    │   ├── MemoryNotFoundError
    │   └── BackupNotFoundError       no such backup (manifest) at the target
    ├── ResourceExhaustedError
    │   ├── QuotaExceededError        maxMemories
    │   ├── RateLimitedError          maxWritesPerSecond, maxRecallsPerSecond
    │   ├── LimitReachedError         a server limit: concurrent calls, streams, batch bytes
    │   ├── DiskFullError             the space's volume has no room
    │   └── SubscriberTooSlowError    a change feed reader fell behind its buffer (resumable)
    ├── FailedPreconditionError
    │   ├── SpaceInactiveError
    │   ├── SpaceOffloadedError       the space lives in a backup (state Offloaded)
    │   ├── SpaceSealedError          a final backup took its last writes: no more writes
    │   ├── ManagedIndexError         CreateSpace/DeleteSpace under the operator
    │   ├── SpaceConflictError        a space exists with another configuration
    │   ├── LsnNotRetainedError       a replay from an LSN the WAL no longer holds
    │   ├── BackupRefusedError        a restore refused: a file missing, corrupt, or a target
    │   │                             that already holds a space
    │   └── SpaceRefusedError         the volume is not this space's, or its WAL is corrupt
    │       ├── IdentityMismatchError
    │       └── CorruptWalError
    ├── UnavailableError              being mounted, loaded after a failure, or draining
    │   ├── SubscriptionEndedError    a change feed ended by an unload or a drain (resumable)
    │   ├── SpaceRestoringError       its volume is being filled from a backup
    │   ├── ObjectStoreError          the backup target failed or could not be reached
    │   └── DataRootInUseError        another process holds a standalone data root
    └── ResumableError                a stream that ended early, with the LSN to resume from
"""

from __future__ import annotations

from memspace_contract.wire import Lsn


class MemspaceError(Exception):
    """Base of every error the server reports to a client on purpose."""


class InvalidArgumentError(MemspaceError):
    pass


class InvalidSpaceIdError(InvalidArgumentError):
    pass


class InvalidMemoryError(InvalidArgumentError):
    pass


class UnauthenticatedError(MemspaceError):
    pass


class PermissionDeniedError(MemspaceError):
    pass


class NotFoundError(MemspaceError):
    pass


class SpaceNotFoundError(NotFoundError):
    pass


class MemoryNotFoundError(NotFoundError):
    pass


class BackupNotFoundError(NotFoundError):
    pass


class ResourceExhaustedError(MemspaceError):
    pass


class QuotaExceededError(ResourceExhaustedError):
    pass


class RateLimitedError(ResourceExhaustedError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LimitReachedError(ResourceExhaustedError):
    pass


class DiskFullError(ResourceExhaustedError):
    pass


class ResumableError(MemspaceError):
    """A change feed that ended early: `resume_lsn` is the since_lsn that resumes it."""

    def __init__(self, message: str, resume_lsn: int) -> None:
        super().__init__(message)
        self.resume_lsn = Lsn(resume_lsn)


class SubscriberTooSlowError(ResourceExhaustedError, ResumableError):
    pass


class FailedPreconditionError(MemspaceError):
    pass


class SpaceInactiveError(FailedPreconditionError):
    pass


class SpaceOffloadedError(FailedPreconditionError):
    pass


class SpaceSealedError(FailedPreconditionError):
    pass


class ManagedIndexError(FailedPreconditionError):
    pass


class SpaceConflictError(FailedPreconditionError):
    pass


class LsnNotRetainedError(FailedPreconditionError):
    pass


class BackupRefusedError(FailedPreconditionError):
    pass


class SpaceRefusedError(FailedPreconditionError):
    pass


class IdentityMismatchError(SpaceRefusedError):
    pass


class CorruptWalError(SpaceRefusedError):
    pass


class UnavailableError(MemspaceError):
    pass


class SubscriptionEndedError(UnavailableError, ResumableError):
    pass


class ObjectStoreError(UnavailableError):
    pass


class SpaceRestoringError(UnavailableError):
    pass


class DataRootInUseError(UnavailableError):
    pass
