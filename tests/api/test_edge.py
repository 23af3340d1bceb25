"""Every RPC goes through the one edge: a routing policy, the error table, INTERNAL for bugs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor

from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import errors
from memspace_server.api import errors_map, handling, routing, servicers
from memspace_server.storage import backing_up
from memspace_server.storage import registry as registries
from memspace_server.storage import spaces as storage_spaces
from tests.api.conftest import Running, failure, memory, rpc_callers, until, vec

SERVICERS = {"MemoryService": servicers.MemoryServicer, "SpaceService": servicers.SpaceServicer}


def all_methods() -> list[tuple[descriptor.ServiceDescriptor, descriptor.MethodDescriptor]]:
    return [(service, method) for service in handling.services() for method in service.methods]


def test_every_rpc_has_a_routing_policy_and_a_servicer_method() -> None:
    listed = set()
    for service, method in all_methods():
        full = handling.full_method(service, method)
        listed.add(full)
        assert full in routing.POLICIES, f"{full} has no routing policy"
        servicer = SERVICERS[service.name]
        name = handling.snake_case(method.name)
        assert hasattr(servicer, name), f"{servicer.__name__} lacks {name}"
        behavior = getattr(servicer, name)
        if method.server_streaming:
            assert inspect.isasyncgenfunction(behavior), full
        else:
            assert inspect.iscoroutinefunction(behavior), full
    assert listed == set(routing.POLICIES), "a policy names an RPC that does not exist"


async def test_every_rpc_is_served_through_the_edge(standalone: Running, tmp_path: Path) -> None:
    """The edge counts every call it handles: calling each RPC once must count each method."""
    m, sp = standalone.memories, standalone.spaces

    async def batch() -> AsyncIterator[pb.RememberRequest]:
        yield pb.RememberRequest(memory=memory("b"))

    await m.Remember(pb.RememberRequest(memory=memory("a")))
    await m.RememberBatch(batch())
    await m.Recall(pb.RecallRequest(cue=vec(1), k=1))
    await failure(m.Get(pb.GetRequest(id="missing")))
    await m.Forget(pb.ForgetRequest(id="missing"))
    stream = m.Subscribe(pb.SubscribeRequest(since_lsn=1))
    async for _ in stream:
        break
    stream.cancel()
    await m.Consolidate(pb.ConsolidateRequest())
    await sp.CreateSpace(pb.CreateSpaceRequest(space="other", embedding_dim=4))
    await sp.ListSpaces(pb.ListSpacesRequest())
    await sp.Health(pb.HealthRequest())
    await sp.DeleteSpace(pb.DeleteSpaceRequest(space="other"))
    await failure(sp.ApplyIndexEntry(pb.ApplyIndexEntryRequest(space="other")))
    target = pb.BackupTarget(url=str(tmp_path / "backups"))
    taken = await sp.BackupSpace(pb.BackupSpaceRequest(space="default", target=target))
    # The default space holds memories: a restore into it is refused.
    await failure(
        sp.RestoreSpace(
            pb.RestoreSpaceRequest(space="default", target=target, backup_id=taken.backup_id)
        )
    )
    await sp.DeleteBackup(
        pb.DeleteBackupRequest(space="default", target=target, backup_id=taken.backup_id)
    )
    registry = standalone.server.metrics.registry

    def counted() -> set[str]:
        return {
            str(sample.labels["method"])
            for family in registry.collect()
            if family.name == "memspace_requests"
            for sample in family.samples
            if sample.name == "memspace_requests_total"
        }

    # The cancelled stream is counted when it finishes on the server, a moment later.
    await until(lambda: "MemoryService/Subscribe" in counted())
    expected = {f"{service.name}/{method.name}" for service, method in all_methods()}
    assert counted() == expected
    get = registry.get_sample_value(
        "memspace_requests_total",
        {"space": "default", "method": "MemoryService/Get", "code": "NOT_FOUND"},
    )
    assert get == 1


def test_the_error_table_names_every_domain_error() -> None:
    classes = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.MemspaceError)
    }
    assert classes == set(errors_map.TABLE), "choose a status code for every domain error"
    assert errors_map.code_for(errors.SubscriberTooSlowError("x", 3)) is (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert errors_map.code_for(errors.CorruptWalError("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert errors_map.code_for(errors.SpaceConflictError("x")) is (
        grpc.StatusCode.FAILED_PRECONDITION
    )


BROKEN = {
    "Remember": (storage_spaces.Space, "remember_many"),
    "RememberBatch": (storage_spaces.Space, "commit_batch"),
    "Recall": (storage_spaces.Space, "recall"),
    "Get": (storage_spaces.Space, "get"),
    "Forget": (storage_spaces.Space, "forget"),
    "Subscribe": (storage_spaces.Space, "subscribe"),
    "Consolidate": (storage_spaces.Space, "consolidate"),
    "CreateSpace": (registries.Registry, "create"),
    "DeleteSpace": (registries.Registry, "delete"),
    "ListSpaces": (registries.Registry, "entries"),
    "Health": (registries.Registry, "health"),
    "ApplyIndexEntry": (registries.Registry, "apply"),
    "BackupSpace": (backing_up.Backups, "backup"),
    "RestoreSpace": (backing_up.Backups, "restore"),
    "DeleteBackup": (backing_up.Backups, "delete"),
}


def test_every_rpc_is_checked_for_internal_errors() -> None:
    assert set(BROKEN) == {method.name for _, method in all_methods()}


@pytest.mark.parametrize("rpc", sorted(BROKEN))
async def test_an_unexpected_error_is_internal_and_leaks_nothing(
    standalone: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, rpc: str
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals /var/lib/x")

    owner, name = BROKEN[rpc]
    monkeypatch.setattr(owner, name, broken)
    field = "new-space" if rpc == "CreateSpace" else "default"
    with caplog.at_level(logging.ERROR):
        err = await failure(rpc_callers(standalone.api)[rpc](field, ()))
    assert err.code() is grpc.StatusCode.INTERNAL
    details = err.details() or ""
    assert "secret" not in details
    assert "internal error" in details
    assert "secret internals" in caplog.text  # the traceback goes to the log only


@pytest.mark.parametrize(
    ("service", "method"),
    [(service, method) for service, method in all_methods() if not method.client_streaming],
    ids=lambda value: getattr(value, "name", ""),
)
async def test_bytes_that_are_not_the_request_message_are_invalid_for_every_rpc(
    standalone: Running,
    service: descriptor.ServiceDescriptor,
    method: descriptor.MethodDescriptor,
) -> None:
    """Whether or not its request names a space, no RPC runs on a request it cannot parse."""
    path = handling.full_method(service, method)
    garbage = b"\xff\xff\xff"
    channel = standalone.api.channel
    if method.server_streaming:
        stream = channel.unary_stream(path, None, None)(garbage, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stream:
                pass
    else:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary(path, None, None)(garbage, timeout=30)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in (raised.value.details() or "")
