"""A health round against a real gRPC server on loopback, without a cluster: one Health call lost
to a busy moment does not turn a shard's spaces unhealthy; a shard that stays silent does."""

from __future__ import annotations

from pathlib import Path

import grpc

from memspace_contract import spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_operator import health
from memspace_operator.settings import Settings

TOKEN = "admin-token-for-health-rounds"
NOTES = spaces.SpaceId("notes")


class Shard:
    """A shard's SpaceService.Health (the only method served) that refuses the first
    `refusals` calls with UNAVAILABLE."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.calls = 0

    async def health(
        self,
        request: pb.HealthRequest,
        context: grpc.aio.ServicerContext[pb.HealthRequest, pb.HealthResponse],
    ) -> pb.HealthResponse:
        self.calls += 1
        assert ("authorization", f"Bearer {TOKEN}") in tuple(context.invocation_metadata() or ())
        if self.calls <= self.refusals:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "busy")
        space = pb.SpaceHealth(space="notes", state="Active", memories=3)
        return pb.HealthResponse(status="SERVING", spaces=[space])


async def round_against(shard: Shard, tmp_path: Path) -> health.ShardHealth:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        shard.health,
        request_deserializer=pb.HealthRequest.FromString,
        response_serializer=pb.HealthResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("memspace.v1.SpaceService", {"Health": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    settings = Settings.from_env(
        {
            "MEMSPACE_ADMIN_TOKEN_FILE": str(token),
            "MEMSPACE_SHARD_ENDPOINT_TEMPLATE": f"127.0.0.1:{port}",
            "MEMSPACE_TLS_ENABLED": "false",
        }
    )
    results: list[health.ShardHealth] = []

    async def on_health(result: health.ShardHealth) -> None:
        results.append(result)

    poller = health.Poller(settings, lambda: [0], on_health)
    try:
        await poller.poll()
    finally:
        await poller.close()
        await server.stop(None)
    (result,) = results
    return result


async def test_a_shard_that_misses_one_call_is_asked_again_and_stays_healthy(
    tmp_path: Path,
) -> None:
    shard = Shard(refusals=1)
    result = await round_against(shard, tmp_path)
    assert shard.calls == 2
    assert result.error is None
    condition, figures = health.assess(result, NOTES)
    assert (condition.status, condition.reason) == ("True", "Serving")
    assert figures is not None
    assert figures.memories == 3


async def test_a_shard_that_stays_silent_is_reported_unreachable(tmp_path: Path) -> None:
    shard = Shard(refusals=2)
    result = await round_against(shard, tmp_path)
    assert shard.calls == 2
    assert result.error == "UNAVAILABLE"
    condition, _ = health.assess(result, NOTES)
    assert (condition.status, condition.reason) == ("False", "ShardUnreachable")
