"""The servicers of memspace.v1: thin. Each method converts its request (`converters`), calls
the storage engine for the space its `Call` was routed to, and converts the answer. Routing,
auth, errors, metrics and logs happen at the edge (`handling`), never here."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

from memspace_contract import index, wire
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import embedding, errors
from memspace_server.api import converters
from memspace_server.api.handling import Call
from memspace_server.storage import backing_up, memories
from memspace_server.storage import registry as registries


class MemoryServicer:
    def __init__(
        self,
        registry: registries.Registry,
        draining: Callable[[], bool],
        max_batch: int,
        max_batch_bytes: int,
        max_recall_response_bytes: int,
        *,
        embedder: embedding.Embedder | None = None,
    ) -> None:
        self.registry = registry
        self.draining = draining
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.max_recall_response_bytes = max_recall_response_bytes
        self.embedder = embedder
        self.embed_batch = embedder.batch if embedder is not None else 64

    async def _embed(self, call: Call, texts: Sequence[str], what: str) -> embedding.Vectors:
        """Embed `texts` (memories' content or a recall's query) with the space's model; refused
        INVALID_ARGUMENT on a space without one."""
        space_id = call.space
        entry = call.entry or self.registry.entries().get(space_id)
        if entry is None:
            raise errors.SpaceNotFoundError(f"space {space_id!r} does not exist")
        if entry.embedding is None or self.embedder is None:
            raise errors.InvalidMemoryError(
                f"space {space_id!r} has no embedding model, so the server cannot embed {what}: "
                f"send the embedding (exactly {entry.embedding_dim} floats), or use a space "
                "created with an embedding model (spec.embedding.model, CreateSpace's "
                "embedding_model)"
            )
        if not all(text.strip() for text in texts):
            raise errors.InvalidMemoryError(
                f"{what} is blank and no embedding was sent: send text to embed, or the "
                "embedding itself"
            )
        return await self.embedder.embed(space_id, entry.embedding.model, texts)

    async def _embedded(self, call: Call, drafts: list[memories.Draft]) -> list[memories.Draft]:
        """`drafts` with every one that has no embedding embedded from its content (in one
        call of the model for all of them)."""
        missing = [i for i, draft in enumerate(drafts) if not draft.embedding.size]
        if not missing:
            return drafts
        vectors = await self._embed(
            call, [drafts[i].content for i in missing], "a memory's content"
        )
        done = list(drafts)
        for row, i in enumerate(missing):
            done[i] = dataclasses.replace(drafts[i], embedding=vectors[row])
        return done

    async def remember(self, request: pb.RememberRequest, call: Call) -> pb.RememberResponse:
        draft = converters.draft(request)
        if not draft.embedding.size:
            (draft,) = await self._embedded(call, [draft])
        async with self.registry.lease(call.space, call.entry) as space:
            memory_id, lsn = await space.remember(draft)
        return pb.RememberResponse(id=memory_id, lsn=lsn)

    async def remember_batch(
        self, requests: AsyncIterator[pb.RememberRequest], call: Call
    ) -> pb.RememberBatchResponse:
        async with self.registry.lease(call.space, call.entry) as space:
            # Each memory is checked and staged as it arrives (a chunk in RAM, the rest on the
            # space's volume), within the stream's count and byte budget: a stream never holds
            # more than a little RAM, however large, and nothing is stored unless all of it is.
            stage = space.stage_batch(self.max_batch_bytes, self.max_batch)
            try:
                # Memories without an embedding are held until `embed_batch` of them have
                # come, then embedded in one call of the model and staged in their order.
                held: list[memories.Draft] = []
                waiting = 0
                async for request in requests:
                    draft = converters.draft(request)
                    held.append(draft)
                    waiting += not draft.embedding.size
                    if waiting >= self.embed_batch or not waiting:
                        for ready in await self._embedded(call, held):
                            await stage.add(ready, time.time())
                        held, waiting = [], 0
                for ready in await self._embedded(call, held):
                    await stage.add(ready, time.time())
                count, last_lsn, ids = await space.commit_batch(stage)
            finally:
                stage.close()
        return pb.RememberBatchResponse(count=count, last_lsn=last_lsn, ids=ids)

    async def recall(self, request: pb.RecallRequest, call: Call) -> pb.RecallResponse:
        query = converters.query(request)
        if not query.cue.size and request.query and request.mode != pb.RECALL_MODE_KEYWORD:
            query = await self._cued(query, request, call)
        async with self.registry.lease(call.space, call.entry) as space:
            hits = await space.recall(query)
        dim = space.dim if query.include_embeddings else 0
        if converters.recall_size_at_most(len(hits), dim) <= self.max_recall_response_bytes:
            return converters.recall_response(hits, query.mode)
        size = converters.recall_size(hits)
        if size > self.max_recall_response_bytes:
            raise errors.LimitReachedError(
                f"this recall would answer {size} bytes; at most {self.max_recall_response_bytes} "
                "are sent. Ask for fewer hits (k), without embeddings, or with tag filters"
            )
        return converters.recall_response(hits, query.mode)

    async def _cued(
        self, query: memories.Query, request: pb.RecallRequest, call: Call
    ) -> memories.Query:
        """`query`, which has no cue but a text query and is not a keyword recall, with its cue
        embedded from that text: vector recall by text, and the vector half of hybrid recall on
        a space with a model."""
        if request.mode == pb.RECALL_MODE_HYBRID:
            entry = call.entry or self.registry.entries().get(call.space)
            if entry is None or entry.embedding is None:
                return query
        (cue,) = await self._embed(call, [request.query], "the recall's query")
        return dataclasses.replace(query, cue=cue)

    async def get(self, request: pb.GetRequest, call: Call) -> pb.GetResponse:
        async with self.registry.lease(call.space, call.entry) as space:
            found = await space.get(request.id)
        response = pb.GetResponse()
        converters.fill_memory(response.memory, found)
        return response

    async def forget(self, request: pb.ForgetRequest, call: Call) -> pb.ForgetResponse:
        async with self.registry.lease(call.space, call.entry) as space:
            forgotten, lsn = await space.forget(request.id)
        return pb.ForgetResponse(forgotten=forgotten, lsn=lsn)

    async def consolidate(
        self, request: pb.ConsolidateRequest, call: Call
    ) -> pb.ConsolidateResponse:
        async with self.registry.lease(call.space, call.entry) as space:
            consolidated = await space.consolidate()
        return pb.ConsolidateResponse(consolidated=consolidated)

    async def subscribe(
        self, request: pb.SubscribeRequest, call: Call
    ) -> AsyncGenerator[pb.MemoryEvent, None]:
        if self.draining():
            raise errors.UnavailableError("the server is draining; subscribe again shortly")
        space_id = call.space
        async with self.registry.lease(space_id, call.entry) as space:
            resume = request.since_lsn or space.durable_lsn + 1
            stream = await space.subscribe(request.since_lsn)
            try:
                # A drain that began while this call loaded the space has closed the feeds
                # already: end at once rather than hold the drain.
                if not self.draining():
                    async for event in stream:
                        yield converters.event(space_id, event)
                        resume = event.lsn + 1
            finally:
                # Close the feed's subscription now, not when the generator is collected.
                await stream.aclose()
        # The feed ended without an error: the space was unloaded or the server is draining.
        why = "the server is draining" if self.draining() else f"space {space_id!r} was unloaded"
        raise errors.SubscriptionEndedError(
            f"{why}; subscribe again with since_lsn={resume} to resume", resume_lsn=resume
        )


class SpaceServicer:
    def __init__(
        self,
        registry: registries.Registry,
        draining: Callable[[], bool],
        backups: backing_up.Backups,
        store_timeout_s: float = 30.0,
        embedder: embedding.Embedder | None = None,
    ) -> None:
        self.registry = registry
        self.draining = draining
        self.backups = backups
        self.store_timeout_s = store_timeout_s
        self.embedder = embedder

    def _embedding(self, request: pb.CreateSpaceRequest) -> tuple[int, index.Embedding | None]:
        """The space's dimension and embedding model: the model's dimension when it has one."""
        name = request.embedding_model
        if not name:
            return converters.embedding_dim(request), None
        if self.embedder is None:
            raise errors.InvalidArgumentError(
                "this server offers no embedding model: create the space without one"
            )
        model = self.embedder.model(name)
        if request.embedding_dim and request.embedding_dim != model.dim:
            raise errors.InvalidArgumentError(
                f"embedding_dim is {request.embedding_dim} but embedding model {name!r} makes "
                f"{model.dim}-dimensional vectors: leave embedding_dim 0 or set {model.dim}"
            )
        return model.dim, index.Embedding(model=model.name)

    async def create_space(self, request: pb.CreateSpaceRequest, call: Call) -> pb.Space:
        dim, model = self._embedding(request)
        entry, created = await self.registry.create(
            call.space,
            dim,
            embedding=model,
            tiers_config=converters.tiers(request),
            quota=converters.quota(request),
            token_sha256=converters.token_sha256(request),
            search=converters.search_index(request),
        )
        return converters.space(entry, created)

    async def delete_space(
        self, request: pb.DeleteSpaceRequest, call: Call
    ) -> pb.DeleteSpaceResponse:
        return pb.DeleteSpaceResponse(deleted=await self.registry.delete(call.space))

    async def list_spaces(self, request: pb.ListSpacesRequest, call: Call) -> pb.ListSpacesResponse:
        entries = self.registry.entries()
        return pb.ListSpacesResponse(
            spaces=[converters.space(entries[space_id]) for space_id in sorted(entries)]
        )

    async def health(self, request: pb.HealthRequest, call: Call) -> pb.HealthResponse:
        found = await self.registry.health(call.route.space)
        return pb.HealthResponse(
            status=wire.DRAINING if self.draining() else wire.SERVING,
            spaces=[converters.space_health(h) for h in found],
        )

    async def apply_index_entry(
        self, request: pb.ApplyIndexEntryRequest, call: Call
    ) -> pb.ApplyIndexEntryResponse:
        entry = None
        if request.entry:
            try:
                entry = index.loads(request.entry)
            except index.InvalidIndexEntryError as err:
                raise errors.InvalidArgumentError(f"the index entry is not valid: {err}") from err
        generation = entry.generation if entry is not None else request.removed_generation
        state, applied = await self.registry.apply(call.space, entry, generation)
        return pb.ApplyIndexEntryResponse(state=state, generation=applied)

    async def backup_space(
        self, request: pb.BackupSpaceRequest, call: Call
    ) -> pb.BackupSpaceResponse:
        taken = await self.backups.backup(
            call.space,
            converters.backup_target(request.target, self.store_timeout_s),
            request.backup_id,
            final=request.final,
        )
        return converters.backup_response(taken)

    async def restore_space(
        self, request: pb.RestoreSpaceRequest, call: Call
    ) -> pb.RestoreSpaceResponse:
        manifest = await self.backups.restore(
            call.space,
            converters.backup_target(request.target, self.store_timeout_s),
            request.backup_id,
            converters.source_space(request.source_space),
        )
        return pb.RestoreSpaceResponse(
            lsn=manifest.lsn, memories=manifest.memories, bytes=manifest.bytes
        )

    async def delete_backup(
        self, request: pb.DeleteBackupRequest, call: Call
    ) -> pb.DeleteBackupResponse:
        if not request.backup_id:
            raise errors.InvalidArgumentError("DeleteBackup needs the backup_id to delete")
        deleted = await self.backups.delete(
            call.space,
            converters.backup_target(request.target, self.store_timeout_s),
            request.backup_id,
        )
        return pb.DeleteBackupResponse(bytes_deleted=deleted.bytes)
