"""The credentials Secret `<name>-memspace` in the MemorySpace's namespace: keys `space`,
`endpoint` and `token`, all a client needs (design section 3), and `ca.crt` when the shards
serve TLS (the CA bundle their certificates chain to), and `tls.crt`/`tls.key` with mutual TLS
(the space's client certificate).

The operator never reads Secrets outside the server namespace: its cluster-wide rights on
Secrets are create and delete. So the token's SHA-256 in the shard's index is the record of
which token the Secret holds, and it is written *before* the Secret is created:

1. When the index holds a hash from this incarnation of the space, a dry-run create tells
   whether the Secret exists (it needs only the create right); if it does, done: the token is
   never rotated by accident.
2. Otherwise a new token is made, its hash written to the index, then the Secret is created,
   and the uid the API server gave it is recorded on the space's PVC (`proof`).

A Secret of that name found at 2 (by a dry-run create; for a new space, whose Secret almost
never exists, by the create itself) is deleted only with the recorded uid as a precondition, so
the API server deletes exactly the Secret the operator made and nothing else. A Secret it cannot
prove it made (a tenant's own, or one from a run interrupted between creating it and recording
its uid) is left alone: the space's index entry is withdrawn and the space waits, with reason
SecretNotOwned, until the tenant deletes or renames it. The same proof guards the delete at
deletion; without one the Secret's ownerReference lets the garbage collector remove it.

A crash between 2's first two writes leaves a hash whose Secret does not exist: the next run
finds no Secret and makes a new token. Deleting the Secret on purpose rotates the token the same
way.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from memspace_contract import index
from memspace_operator import certificates, errors, kube, models, naming

TOKEN_BYTES = 32


def new_token() -> str:
    """32 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()


def manifest(
    space: models.MemorySpace,
    endpoint: str,
    token: str,
    ca: bytes | None = None,
    client_pair: certificates.KeyPair | None = None,
) -> dict[str, Any]:
    ref = space.ref
    data = {"space": space.spec.space_id, "endpoint": endpoint, "token": token}
    if ca is not None:
        data["ca.crt"] = ca.decode()
    if client_pair is not None:
        data["tls.crt"], data["tls.key"] = client_pair.cert.decode(), client_pair.key.decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": naming.credentials_secret(ref.name),
            "namespace": ref.namespace,
            "labels": naming.space_labels(space.spec.space_id, ref.namespace, ref.name),
            # Same namespace as its MemorySpace: garbage collection backs up the finalizer.
            "ownerReferences": [
                {
                    "apiVersion": naming.API_VERSION,
                    "kind": naming.KIND,
                    "name": ref.name,
                    "uid": ref.uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "type": "Opaque",
        "stringData": data,
    }


async def exists(client: kube.Kube, space: models.MemorySpace) -> bool:
    probe = manifest(space, "", "")
    try:
        await client.create(kube.secrets(space.ref.namespace), probe, dry_run=True)
    except errors.AlreadyExistsError:
        return True
    return False


def not_owned(space: models.MemorySpace) -> errors.SecretNotOwnedError:
    secret = naming.credentials_secret(space.ref.name)
    return errors.SecretNotOwnedError(
        f"a Secret named {secret} already exists in this namespace and memspace did not make it "
        "(memspace never reads, replaces or deletes a Secret it did not create); delete or "
        f"rename that Secret and the credentials are created at the next check"
    )


async def _delete_own(client: kube.Kube, url: str, proof: str | None) -> bool:
    """Delete the Secret at `url` if it is the one whose uid is `proof`; whether it was."""
    if proof is None:
        return False
    try:
        return await client.delete(url, uid=proof)
    except errors.ConflictError:
        return False  # another Secret of that name: not ours


async def ensure(
    client: kube.Kube,
    space: models.MemorySpace,
    endpoint: str,
    trusted_sha256: str | None,
    record: Callable[[str], Awaitable[None]],
    *,
    ca: bytes | None = None,
    client_pair: Callable[[], Awaitable[certificates.KeyPair | None]] | None = None,
    proof: str | None,
    remember: Callable[[str], Awaitable[None]],
    new: bool = False,
) -> tuple[str, bool]:
    """Make sure the Secret exists with a token whose hash the index holds. `record` writes a
    new hash to the index; `proof` is the uid of the Secret the operator last created and
    `remember` records a new one; `new`: the space's claim was just made, so no Secret can be
    proven its own. Returns (token SHA-256, whether a new token was made);
    errors.SecretNotOwnedError when a Secret of that name is not the operator's."""
    if trusted_sha256 is not None and await exists(client, space):
        return trusted_sha256, False
    url = kube.secrets(space.ref.namespace, naming.credentials_secret(space.ref.name))
    # A new space's Secret almost never exists: it is created without asking first (a dry run
    # each was a request per space), and one found is handled as below, once.
    if not new and await exists(client, space) and not await _delete_own(client, url, proof):
        raise not_owned(space)
    token = new_token()
    digest = index.token_sha256(token)
    await record(digest)
    pair = None if client_pair is None else await client_pair()
    body = manifest(space, endpoint, token, ca, pair)
    try:
        created = await client.create(kube.secrets(space.ref.namespace), body)
    except errors.AlreadyExistsError as err:
        if new:
            raise not_owned(space) from err  # a new space proves no Secret its own
        raise errors.TemporaryError(
            f"credentials Secret {url} is still being deleted; retrying", delay=2.0
        ) from err
    await remember(str(created["metadata"]["uid"]))
    return digest, True


async def remove(client: kube.Kube, ref: models.SpaceRef, proof: str | None) -> bool:
    """Delete the credentials Secret if it is the one the operator made (uid `proof`); without a
    proof, the Secret's ownerReference lets the garbage collector remove it."""
    url = kube.secrets(ref.namespace, naming.credentials_secret(ref.name))
    try:
        return await _delete_own(client, url, proof)
    except errors.ForbiddenError:
        # The namespace is terminating or gone with everything in it.
        return False
