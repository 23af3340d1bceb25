"""The words of memspace.v1 beyond its protobuf messages, spelled once for the server, the
operator and clients: gRPC metadata keys, the values of Health's string fields, and the types of
the numbers and names the messages carry (LSNs, shard numbers, tier names).

Each is a typed constant (`Final` of a `Literal`), so a misspelling is a type error.
"""

from __future__ import annotations

from typing import Final, Literal, NewType

# -- gRPC metadata ---------------------------------------------------------------------------------

SPACE_KEY: Final = "x-memory-space"
"""Request metadata naming the call's space (wins over the request's `space` field)."""
AUTHORIZATION_KEY: Final = "authorization"
"""Request metadata `Bearer <token>`: the space's token or the admin token."""
BEARER: Final = "Bearer"
"""The scheme of AUTHORIZATION_KEY."""
REQUEST_ID_KEY: Final = "x-request-id"
"""Optional request metadata: the ID the server logs the call under (else it makes one)."""
RESUME_LSN_KEY: Final = "memspace-resume-lsn"
"""Trailing metadata of a Subscribe stream that ended early: the since_lsn to resume from."""
RETRY_AFTER_KEY: Final = "memspace-retry-after-s"
"""Trailing metadata of a call refused by a rate quota: seconds until a retry can succeed."""

# -- Health ----------------------------------------------------------------------------------------

ServerStatus = Literal["SERVING", "DRAINING"]
"""HealthResponse.status."""
SERVING: Final = "SERVING"
DRAINING: Final = "DRAINING"

SpaceState = Literal["Active", "Inactive", "Offloaded", "Restoring", "Unmounted", "Failed"]
"""SpaceHealth.state: the index state of a served space, or why it is not served."""
ACTIVE: Final = "Active"
INACTIVE: Final = "Inactive"
OFFLOADED: Final = "Offloaded"
"""Its data lives in a backup (a final BackupSpace took it): not loaded, calls refused with
FAILED_PRECONDITION, its volume may be gone. Active again: a RestoreSpace brings it back."""
RESTORING: Final = "Restoring"
"""Its volume is being filled from a backup: not served, calls get UNAVAILABLE (retry). In the
index (the operator's, around a RestoreSpace), and in Health while a RestoreSpace runs."""
UNMOUNTED: Final = "Unmounted"
"""In the index, but its volume is not mounted on the shard (yet)."""
FAILED: Final = "Failed"
"""Refused (a wrong volume, a corrupt WAL) or failed after loading; the shard's log says why."""
ABSENT: Final = "Absent"
"""ApplyIndexEntryResponse.state of a space not in the index (removed): not served."""

# -- numbers and names -------------------------------------------------------------------------

Lsn = NewType("Lsn", int)
"""A position in a space's WAL (log sequence number): 1 for its first record, 0 for none."""

ShardNumber = NewType("ShardNumber", int)
"""The number N of server shard `memspace-shard-N` (from 0)."""

TierName = Literal["hot", "warm", "cold"]
"""RecallHit.tier and the keys of SpaceHealth.tier_memories."""
HOT: Final = "hot"
WARM: Final = "warm"
COLD: Final = "cold"
TIERS: Final[tuple[TierName, ...]] = (HOT, WARM, COLD)
"""Every tier, hottest first."""
