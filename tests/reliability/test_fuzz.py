"""Bad input, fuzzed, against a real `memspace serve` that checks tokens:

- a hypothesis state machine sends well-typed but arbitrary requests to every RPC (any space
  naming, any token, NaN/inf/huge/tiny vectors of any length, oversized content, tags and ids,
  any k, min_score, since_lsn, tier and quota settings) and checks each answer against an
  oracle written from design section 5 and docs/api.md: the exact status code, the exact
  contents of every accepted write, every recall and every replayed event;
- a protocol-level fuzzer sends raw bytes (random, and mutations of valid messages: bit flips,
  truncations, unknown and wrongly typed fields, huge lengths, deep nesting, oversized
  payloads) with random metadata to every RPC through a generic channel.

Throughout: no crash, no hang (every call has a deadline), only the status codes of section 5,
no traceback in the server log, and after every rejected request the space's data unchanged
(a full comparison with the model, plus its WAL position: the next accepted write must get the
next LSN). A bystander space is never touched.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from tests.reliability.conftest import ADMIN_TOKEN, CALL_TIMEOUT_S, DIM, Servers, soak

FUZZ, BYSTANDER, DEFAULT = "fuzz", "bystander", "default"
TOKENS = {FUZZ: "token-of-fuzz", BYSTANDER: "token-of-bystander"}
PROTECTED = (FUZZ, BYSTANDER, DEFAULT)
POOL = [f"m-{n}" for n in range(150)]
MAX_CONTENT = 64 * 1024
MAX_MESSAGE = 4 * 1024 * 1024

C = grpc.StatusCode
SECTION_5 = frozenset(
    {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.UNAUTHENTICATED,
        C.PERMISSION_DENIED,
        C.RESOURCE_EXHAUSTED,
        C.FAILED_PRECONDITION,
    }
)
"""Every code a request may get from a healthy server (UNAVAILABLE is for mounts, reloads and
drains, which do not happen here; INTERNAL and UNKNOWN are bugs)."""


# -- the model ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stored:
    content: str
    embedding: tuple[float, ...]
    confidence: float
    tags: tuple[tuple[str, str], ...]


def stored(memory: pb.Memory) -> Stored:
    return Stored(
        content=memory.content,
        embedding=tuple(float(v) for v in np.asarray(memory.embedding, np.float32)),
        confidence=float(np.float32(memory.confidence if memory.HasField("confidence") else 1.0)),
        tags=tuple(sorted(memory.tags.items())),
    )


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a call names its space and its token."""

    headers: tuple[str, ...] = ()
    field: str = ""
    auth: tuple[str, ...] = ()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            *(("x-memory-space", h) for h in self.headers),
            *(("authorization", a) for a in self.auth),
        )


def route(  # noqa: PLR0911  # one return per row of the routing tables
    naming: Naming, named: bool = False, admin_only: bool = False
) -> C | str:
    """The status the edge answers, or the space the call reaches (design section 5 and the
    tables of docs/api.md). `named`: no default space (CreateSpace, DeleteSpace); `admin_only`:
    SpaceService calls that need the admin token."""
    if len(set(naming.headers)) > 1:
        return C.INVALID_ARGUMENT
    header = naming.headers[0] if naming.headers else None
    if header == "":  # an empty header defers to the field and names no space by itself
        if not naming.field:
            return C.INVALID_ARGUMENT
        header = None
    if header is not None and naming.field and header != naming.field:
        return C.INVALID_ARGUMENT
    name = header if header is not None else naming.field or None
    if name is None:
        if named:
            return C.INVALID_ARGUMENT
        name = DEFAULT
    if not spaces.is_valid_space_id(name):
        return C.INVALID_ARGUMENT
    if len(naming.auth) != 1:
        return C.UNAUTHENTICATED
    scheme, _, token = naming.auth[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return C.UNAUTHENTICATED
    admin = token == ADMIN_TOKEN
    known = name in PROTECTED
    own_token = TOKENS.get(name)
    if admin_only:
        allowed = admin
    else:
        allowed = (own_token is not None and token == own_token) or (admin and own_token is None)
    if not allowed:
        return C.PERMISSION_DENIED
    if not known and not admin_only:
        return C.NOT_FOUND
    return name


def vector_problem(values: Sequence[float]) -> bool:
    vector = np.asarray(values, np.float32)
    if vector.shape != (DIM,):
        return True
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are the point
        square = float(np.dot(vector, vector))
    return square == 0.0 or not math.isfinite(square)


def tags_problem(tags: Any) -> bool:
    return len(tags) > 32 or any(
        not key or len(key) > 64 or len(value) > 256 for key, value in tags.items()
    )


def id_problem(memory_id: str) -> bool:
    return len(memory_id) > 128 or not memory_id.isprintable() or memory_id.strip() != memory_id


def memory_problem(memory: pb.Memory | None) -> bool:
    """Whether docs/api.md ("Memory fields") says the memory is refused."""
    if memory is None:
        return True
    if memory.HasField("created_at"):
        created = memory.created_at.seconds + memory.created_at.nanos / 1e9
        if created <= 0:
            return True
    confidence = memory.confidence if memory.HasField("confidence") else 1.0
    return (
        len(memory.content.encode()) > MAX_CONTENT
        or not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0)
        or (bool(memory.id) and id_problem(memory.id))
        or vector_problem(memory.embedding)
        or tags_problem(memory.tags)
    )


def with_id(memory: pb.Memory, memory_id: str) -> pb.Memory:
    copy = pb.Memory()
    copy.CopyFrom(memory)
    copy.id = memory_id
    return copy


class Target:
    """The server under fuzzing, its blocking stubs, and the model of its fuzz space: every
    memory, the event of every LSN, the WAL position and the first LSN the WAL still holds."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.memories = pb_grpc.MemoryServiceStub(self.channel)
        self.spaces = pb_grpc.SpaceServiceStub(self.channel)
        self.ledger: dict[str, Stored] = {}
        self.history: dict[int, tuple[int, str]] = {}
        self.lsn = 0
        self.retained_from = 1
        self.bystander: dict[str, Stored] = {}
        self.rejected = 0

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def call(method: Callable[..., Any], request: Any, naming: Naming) -> tuple[C, Any]:
        """(OK, the answer) or (the code, the error); a code outside section 5 fails."""
        try:
            answer = method(request, metadata=naming.metadata(), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            failed: Any = err  # also a grpc.Call: it has code() and details()
            code, details = failed.code(), failed.details()
        else:
            return C.OK, answer
        assert code in SECTION_5, f"{code}: {details}"
        return code, failed

    def wrote(self, lsn: int, events: Sequence[tuple[int, str]]) -> None:
        """An accepted write of `events` to the fuzz space ending at `lsn`: the very next LSNs,
        so no rejected request before it appended anything."""
        assert lsn == self.lsn + len(events), f"LSN {lsn}; the model expects {self.lsn} + n"
        for offset, event in enumerate(events):
            self.history[self.lsn + 1 + offset] = event
        self.lsn = lsn

    def holdings(self, space: str) -> dict[str, Stored]:
        """Every memory of a space (they are fewer than k=1000)."""
        found = self.memories.Recall(
            pb.RecallRequest(cue=[1.0] * DIM, k=1000, include_embeddings=True),
            metadata=Naming((space,), auth=(f"Bearer {TOKENS[space]}",)).metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        return {hit.memory.id: stored(hit.memory) for hit in found.hits}

    def check(self) -> None:
        """The fuzz space holds exactly the model; the bystander exactly what it held."""
        assert self.holdings(FUZZ) == self.ledger
        assert self.holdings(BYSTANDER) == self.bystander

    def rejected_call(self) -> None:
        self.rejected += 1
        self.check()


def setup(address: str) -> Target:
    target = Target(address)
    admin = Naming(auth=(f"Bearer {ADMIN_TOKEN}",))
    rng = np.random.default_rng(5)
    for space in (FUZZ, BYSTANDER):
        target.spaces.CreateSpace(
            pb.CreateSpaceRequest(
                space=space, embedding_dim=DIM, token_sha256=index.token_sha256(TOKENS[space])
            ),
            metadata=admin.metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        for n in range(8):
            memory = pb.Memory(
                id=POOL[n] if space == FUZZ else f"bystander-{n}",
                content=f"{space} {n}",
                embedding=rng.normal(size=DIM).astype(np.float32).tolist(),
                tags={"n": str(n % 2)},
            )
            done = target.memories.Remember(
                pb.RememberRequest(memory=memory),
                metadata=Naming((space,), auth=(f"Bearer {TOKENS[space]}",)).metadata(),
                timeout=CALL_TIMEOUT_S,
            )
            if space == FUZZ:
                target.ledger[done.id] = stored(memory)
                target.wrote(done.lsn, [(pb.EVENT_TYPE_REMEMBERED, done.id)])
            else:
                target.bystander[done.id] = stored(memory)
    target.check()
    return target


@pytest.fixture
def target(servers: Servers, admin_token_file: Path) -> Iterator[Target]:
    server = servers(None, "--admin-token-file", str(admin_token_file))
    made = setup(server.start_blocking())
    yield made
    made.close()
    assert server.alive, "the server died under fuzzing:\n" + server.log()
    log = server.log()
    assert "Traceback" not in log, "the server logged a traceback:\n" + log[-20000:]


# -- strategies ----------------------------------------------------------------------------------

HEADERS = st.sampled_from(
    [(FUZZ,)] * 6
    + [(), (FUZZ, FUZZ), (FUZZ, BYSTANDER), ("",), ("Bad-ID",), ("nosuch-space",)]
    + [(BYSTANDER,), (DEFAULT,), ("a" * 64,), ("fu",)]
)
FIELDS = st.sampled_from(["", "", "", FUZZ, FUZZ, BYSTANDER, "nosuch-space", "ab", "Fuzz"])
AUTHS = st.sampled_from(
    [(f"Bearer {TOKENS[FUZZ]}",)] * 8
    + [(), (f"bearer {TOKENS[FUZZ]}",), (f"Bearer   {TOKENS[FUZZ]}",), ("Bearer wrong",)]
    + [(f"Bearer {TOKENS[BYSTANDER]}",), (f"Bearer {ADMIN_TOKEN}",), ("Basic YTpi",)]
    + [("Bearer",), (f"Bearer {TOKENS[FUZZ]}", f"Bearer {TOKENS[FUZZ]}"), (TOKENS[FUZZ],)]
)
NAMINGS = st.builds(Naming, HEADERS, FIELDS, AUTHS)

FINITE = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
ANY32 = st.floats(width=32)


@st.composite
def good_vectors(draw: st.DrawFn) -> list[float]:
    values = draw(st.lists(FINITE, min_size=DIM, max_size=DIM))
    if max(abs(v) for v in values) < 1e-3:
        values[0] = 1.0
    return values


ANY_VECTORS = st.one_of(
    good_vectors(),
    st.lists(ANY32, max_size=DIM + 3),
    st.lists(FINITE, max_size=2 * DIM),
    st.sampled_from([[0.0] * DIM, [1e38] * DIM, [1e-30] * DIM, [-0.0] * DIM, []]),
)
GOOD_IDS = st.one_of(st.sampled_from(POOL), st.just(""))
ANY_IDS = st.one_of(
    GOOD_IDS,
    st.text(max_size=140),
    st.sampled_from([" lead", "trail ", "a\nb", "x" * 128, "x" * 129, "\x7f", "bystander-1"]),
)
BIG_CONTENT = st.sampled_from(
    [
        ("a", MAX_CONTENT),
        ("a", MAX_CONTENT + 1),
        ("é", MAX_CONTENT // 2),
        ("é", MAX_CONTENT // 2 + 1),
        ("😀", MAX_CONTENT // 4),
        ("😀", MAX_CONTENT // 4 + 1),
    ]
).map(lambda pair: pair[0] * pair[1])
GOOD_TAGS = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3)
ANY_TAGS = st.one_of(
    GOOD_TAGS,
    st.dictionaries(st.text(max_size=70), st.text(max_size=8), max_size=34),
    st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=300), max_size=3),
)


@st.composite
def memories(draw: st.DrawFn, good: bool) -> pb.Memory:
    memory = pb.Memory(
        id=draw(GOOD_IDS if good else ANY_IDS),
        content=draw(st.text(max_size=60) if good else st.one_of(st.text(), BIG_CONTENT)),
        embedding=draw(good_vectors() if good else ANY_VECTORS),
        tags=draw(GOOD_TAGS if good else ANY_TAGS),
    )
    confidence = draw(
        st.none() | (st.floats(0, 1, width=32) if good else ANY32),
    )
    if confidence is not None:
        memory.confidence = confidence
    if good:
        created = draw(st.none() | st.integers(1, 2**33).map(lambda s: (s, 0)))
    else:
        created = draw(
            st.none() | st.tuples(st.integers(-(2**40), 2**40), st.integers(-(2**31), 2**31 - 1))
        )
    if created is not None:
        memory.created_at.seconds, memory.created_at.nanos = created
    return memory


MEMORIES = st.one_of(memories(good=True), memories(good=True), memories(good=False))


# -- the state machine ---------------------------------------------------------------------------


def expect_routed(code: C, routed: C | str) -> bool:
    """A call the edge refuses; an unknown space may be answered NOT_FOUND or, where the
    request is checked before the space is looked up, INVALID_ARGUMENT."""
    assert isinstance(routed, C)
    allowed = {routed, C.INVALID_ARGUMENT} if routed is C.NOT_FOUND else {routed}
    assert code in allowed, (code, routed)
    return True


class Requests(RuleBasedStateMachine):
    target: Target

    def refused(self, code: C) -> None:
        assert code is not C.OK
        self.target.rejected_call()

    @rule(naming=NAMINGS, memory=st.one_of(MEMORIES, st.none()))
    def remember(self, naming: Naming, memory: pb.Memory | None) -> None:
        t = self.target
        routed = route(naming)
        assume(routed != BYSTANDER)
        code, answer = t.call(
            t.memories.Remember, pb.RememberRequest(space=naming.field, memory=memory), naming
        )
        if isinstance(routed, C):
            expect_routed(code, routed)
        elif memory_problem(memory):
            assert code is C.INVALID_ARGUMENT, (code, memory)
        else:
            assert code is C.OK, (answer, memory)
            assert memory is not None
            if memory.id:
                assert answer.id == memory.id
            if routed == FUZZ:
                t.ledger[answer.id] = stored(with_id(memory, answer.id))
                t.wrote(answer.lsn, [(pb.EVENT_TYPE_REMEMBERED, answer.id)])
        if code is not C.OK:
            self.refused(code)

    @rule(
        naming=NAMINGS,
        batch=st.lists(st.tuples(st.sampled_from(["", "", FUZZ, BYSTANDER]), MEMORIES), max_size=4),
    )
    def remember_batch(self, naming: Naming, batch: list[tuple[str, pb.Memory]]) -> None:
        t = self.target
        first = batch[0][0] if batch and not naming.headers else ""
        routed = route(dataclasses.replace(naming, field=first))
        assume(routed != BYSTANDER)
        checked = batch if naming.headers else batch[1:]
        code, answer = t.call(
            t.memories.RememberBatch,
            iter([pb.RememberRequest(space=space, memory=m) for space, m in batch]),
            dataclasses.replace(naming, field=""),
        )
        if isinstance(routed, C):
            expect_routed(code, routed)
        elif any(s and s != routed for s, _ in checked) or any(memory_problem(m) for _, m in batch):
            assert code is C.INVALID_ARGUMENT, code
        else:
            assert code is C.OK, answer
            assert answer.count == len(batch)
            for (_, memory), memory_id in zip(batch, answer.ids, strict=True):
                assert memory_id == (memory.id or memory_id)
                if routed == FUZZ:
                    t.ledger[memory_id] = stored(with_id(memory, memory_id))
            if routed == FUZZ:
                events = [(pb.EVENT_TYPE_REMEMBERED, i) for i in answer.ids]
                t.wrote(answer.last_lsn if events else t.lsn, events)
        if code is not C.OK:
            self.refused(code)

    @rule(
        naming=NAMINGS,
        cue=ANY_VECTORS,
        k=st.one_of(st.integers(0, 1100), st.just(2**32 - 1)),
        min_score=st.none() | ANY32,
        tags=ANY_TAGS,
        with_embeddings=st.booleans(),
    )
    def recall(
        self,
        naming: Naming,
        cue: list[float],
        k: int,
        min_score: float | None,
        tags: dict[str, str],
        with_embeddings: bool,
    ) -> None:
        t = self.target
        routed = route(naming)
        request = pb.RecallRequest(
            space=naming.field, cue=cue, k=k, tags=tags, include_embeddings=with_embeddings
        )
        if min_score is not None:
            request.min_score = min_score
        code, answer = t.call(t.memories.Recall, request, naming)
        if isinstance(routed, C):
            expect_routed(code, routed)
        elif (
            not 1 <= k <= 1000
            or (min_score is not None and not math.isfinite(min_score))
            or vector_problem(cue)
            or tags_problem(tags)
        ):
            assert code is C.INVALID_ARGUMENT, code
        else:
            assert code is C.OK, answer
            if routed == FUZZ:
                self.check_hits(answer, request)
        if code is not C.OK:
            self.refused(code)

    def check_hits(self, answer: pb.RecallResponse, request: pb.RecallRequest) -> None:
        ledger = self.target.ledger
        matching = [
            i
            for i, m in ledger.items()
            if all(dict(m.tags).get(k) == v for k, v in request.tags.items())
        ]
        scores = [hit.score for hit in answer.hits]
        assert scores == sorted(scores, reverse=True)
        cue = np.asarray(request.cue, np.float64)
        for hit in answer.hits:
            want = ledger[hit.memory.id]
            assert hit.memory.id in matching
            assert hit.memory.content == want.content
            embedding = np.asarray(want.embedding, np.float64)
            cosine = float(cue @ embedding / np.linalg.norm(cue) / np.linalg.norm(embedding))
            assert abs(hit.score - cosine) < 1e-4, (hit.score, cosine)
            if request.include_embeddings:
                assert stored(hit.memory).embedding == want.embedding
            else:
                assert not hit.memory.embedding
        if request.HasField("min_score"):
            assert all(s >= request.min_score - 1e-6 for s in scores)
        else:
            assert len(answer.hits) == min(request.k, len(matching))

    @rule(naming=NAMINGS, memory_id=ANY_IDS)
    def get(self, naming: Naming, memory_id: str) -> None:
        t = self.target
        routed = route(naming)
        code, answer = t.call(
            t.memories.Get, pb.GetRequest(space=naming.field, id=memory_id), naming
        )
        if isinstance(routed, C):
            expect_routed(code, routed)
        elif id_problem(memory_id):
            assert code is C.INVALID_ARGUMENT, code
        elif routed == FUZZ:
            if memory_id in t.ledger:
                assert code is C.OK, answer
                assert stored(answer.memory) == t.ledger[memory_id]
            else:
                assert code is C.NOT_FOUND, code
        elif routed == BYSTANDER and code is C.OK:
            assert stored(answer.memory) == t.bystander[memory_id]
        if code is not C.OK:
            self.refused(code)

    @rule(naming=NAMINGS, memory_id=ANY_IDS)
    def forget(self, naming: Naming, memory_id: str) -> None:
        t = self.target
        routed = route(naming)
        assume(routed != BYSTANDER)
        code, answer = t.call(
            t.memories.Forget, pb.ForgetRequest(space=naming.field, id=memory_id), naming
        )
        if isinstance(routed, C):
            expect_routed(code, routed)
        elif id_problem(memory_id):
            assert code is C.INVALID_ARGUMENT, code
        elif routed == FUZZ:
            assert code is C.OK, answer
            assert answer.forgotten == (memory_id in t.ledger)
            if answer.forgotten:
                del t.ledger[memory_id]
                t.wrote(answer.lsn, [(pb.EVENT_TYPE_FORGOTTEN, memory_id)])
            else:
                assert answer.lsn == 0
        if code is not C.OK:
            self.refused(code)

    @rule(naming=NAMINGS)
    def consolidate(self, naming: Naming) -> None:
        t = self.target
        routed = route(naming)
        code, _ = t.call(t.memories.Consolidate, pb.ConsolidateRequest(space=naming.field), naming)
        if isinstance(routed, C):
            expect_routed(code, routed)
        else:
            assert code is C.OK
            if routed == FUZZ:
                t.retained_from = t.lsn + 1
        if code is not C.OK:
            self.refused(code)

    @rule(
        naming=NAMINGS,
        since=st.one_of(
            st.sampled_from(["0", "1", "-3", "-1", "+0", "+5"]), st.integers(0, 2**64 - 1)
        ),
    )
    def subscribe(self, naming: Naming, since: str | int) -> None:
        """`since` "-n"/"+n": relative to the model's last LSN."""
        t = self.target
        if isinstance(since, int):
            since_lsn = since
        elif since[0] in "+-":
            since_lsn = max(0, t.lsn + int(since))
        else:
            since_lsn = int(since)
        routed = route(naming)
        call: Any = t.memories.Subscribe(
            pb.SubscribeRequest(space=naming.field, since_lsn=since_lsn),
            metadata=naming.metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        timer = threading.Timer(0.25, call.cancel)
        timer.start()
        events: list[pb.MemoryEvent] = []
        code = C.OK
        try:
            for event in call:
                events.append(event)
                if routed == FUZZ and event.lsn >= t.lsn:
                    break
        except grpc.RpcError:
            code = call.code()
        finally:
            timer.cancel()
            call.cancel()
        if code is C.CANCELLED:
            code = C.OK  # open until we hung up
        assert code in SECTION_5, code
        if isinstance(routed, C):
            expect_routed(code, routed)
        elif routed == FUZZ:
            if 0 < since_lsn < t.retained_from:
                assert code is C.FAILED_PRECONDITION, code
            else:
                assert code is C.OK, code
                assert all(e.space == FUZZ for e in events)
                wanted = range(since_lsn, t.lsn + 1) if since_lsn else range(0)
                assert [(e.lsn, e.type, e.id) for e in events] == [
                    (lsn, *t.history[lsn]) for lsn in wanted
                ]
        if code is not C.OK:
            self.refused(code)

    @rule(
        naming=st.builds(
            Naming,
            st.sampled_from([(), ("scratch-a",), ("scratch-b",), (FUZZ,), ("Bad",), ("",)]),
            st.one_of(
                st.sampled_from(["", "scratch-a", "scratch-c", BYSTANDER]), st.text(max_size=70)
            ),
            st.sampled_from([(f"Bearer {ADMIN_TOKEN}",)] * 4 + [(f"Bearer {TOKENS[FUZZ]}",), ()]),
        ),
        dim=st.one_of(st.integers(0, 5000), st.just(2**32 - 1), st.just(DIM)),
        token=st.one_of(st.just(""), st.text(max_size=70), st.sampled_from(["a" * 64, "A" * 64])),
        hot=st.integers(0, 2**64 - 1),
        compression=st.one_of(
            st.sampled_from(["", "zstd", "lz4", "none", "gzip", "ZSTD"]), st.text(max_size=8)
        ),
        max_memories=st.integers(0, 2**64 - 1),
        rate=st.floats(),
    )
    def create_space(
        self,
        naming: Naming,
        dim: int,
        token: str,
        hot: int,
        compression: str,
        max_memories: int,
        rate: float,
    ) -> None:
        t = self.target
        routed = route(naming, named=True, admin_only=True)
        request = pb.CreateSpaceRequest(
            space=naming.field,
            embedding_dim=dim,
            token_sha256=token,
            tiers=pb.SpaceTiers(hot_capacity=hot, cold_compression=compression),
            quota=pb.SpaceQuota(max_memories=max_memories, max_writes_per_second=rate),
        )
        code, answer = t.call(t.spaces.CreateSpace, request, naming)
        if isinstance(routed, C):
            expect_routed(code, routed)
        elif (
            (dim or 768) > 4096
            or hot > 2**40
            or (compression or "zstd") not in index.COMPRESSIONS
            or (token and (len(token) != 64 or any(c not in "0123456789abcdef" for c in token)))
            or not (math.isfinite(rate) and rate >= 0)
        ):
            assert code is C.INVALID_ARGUMENT, code
        elif routed in (FUZZ, BYSTANDER):
            # An existing space is never reconfigured (above all, its token never replaced).
            assert code is (C.OK if (dim or 768) == DIM else C.FAILED_PRECONDITION), code
            if code is C.OK:
                assert not answer.created
            t.check()
        else:
            assert code in (C.OK, C.FAILED_PRECONDITION), code
        if code is not C.OK:
            self.refused(code)

    @rule(
        naming=NAMINGS,
        scratch=st.sampled_from(["scratch-a", "scratch-b", "nosuch-space", "Bad", ""]),
    )
    def delete_space(self, naming: Naming, scratch: str) -> None:
        t = self.target
        naming = dataclasses.replace(
            naming,
            field=scratch,
            auth=(f"Bearer {ADMIN_TOKEN}",) if naming.auth == AUTH_OF_FUZZ else naming.auth,
        )
        routed = route(naming, named=True, admin_only=True)
        assume(routed not in PROTECTED)
        code, _ = t.call(t.spaces.DeleteSpace, pb.DeleteSpaceRequest(space=naming.field), naming)
        if isinstance(routed, C):
            expect_routed(code, routed)
        else:
            assert code is C.OK
        if code is not C.OK:
            self.refused(code)

    @rule(naming=NAMINGS)
    def health_and_list(self, naming: Naming) -> None:
        t = self.target
        code, answer = t.call(t.spaces.Health, pb.HealthRequest(space=naming.field), naming)
        if code is C.OK and len(answer.spaces) == 1 and answer.spaces[0].space == FUZZ:
            assert answer.spaces[0].memories == len(t.ledger)
        code, answer = t.call(t.spaces.ListSpaces, pb.ListSpacesRequest(), naming)
        routed = route(dataclasses.replace(naming, headers=(), field="scratch-x"), admin_only=True)
        assert code is (C.OK if routed == "scratch-x" else routed), (code, routed)

    def teardown(self) -> None:
        self.target.check()


AUTH_OF_FUZZ = (f"Bearer {TOKENS[FUZZ]}",)


@pytest.mark.timeout(soak(300, 1800))
def test_arbitrary_requests_get_section_5_codes_and_rejected_ones_change_nothing(
    target: Target,
) -> None:
    Requests.target = target
    run_state_machine_as_test(
        Requests,
        settings=settings(
            max_examples=soak(12, 300),
            stateful_step_count=soak(30, 60),
            deadline=None,
            # The server is one for all examples on purpose (its state carries over and is
            # checked against the model); shrinking would replay against a moved state.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
            database=None,
        ),
    )
    assert target.rejected > 0


# -- the protocol-level fuzzer --------------------------------------------------------------------


def methods() -> list[tuple[str, Any, Any, str]]:
    """(full name, request type, response type, shape) of every RPC."""
    found = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            shape = (
                "stream-in"
                if method.client_streaming
                else "stream-out"
                if method.server_streaming
                else "unary"
            )
            found.append(
                (
                    f"/{service.full_name}/{method.name}",
                    getattr(pb, method.input_type.name),
                    getattr(pb, method.output_type.name),
                    shape,
                )
            )
    return found


BACKUP_CALLS = ("BackupSpace", "RestoreSpace", "DeleteBackup")
"""Admin calls that reach the object store a request names. A mutated target could name any
address or directory, so the fuzzer sends them only with a tenant's token: their bytes are
parsed and the call refused at the edge, never acted on (tests/backup covers their targets)."""
UNUSED_TARGET = pb.BackupTarget(url="s3://fuzz-bucket", endpoint="http://127.0.0.1:9")


def base_message(request_type: Any, rng: random.Random) -> bytes:
    """A valid request of the type, naming the fuzz space or a scratch one."""
    memory = pb.Memory(
        id=rng.choice(POOL),
        content="raw",
        embedding=[rng.uniform(-1, 1) for _ in range(DIM)],
        tags={"k": "v"},
        confidence=0.5,
    )
    name = request_type.DESCRIPTOR.name
    examples: dict[str, Any] = {
        "RememberRequest": pb.RememberRequest(space=FUZZ, memory=memory),
        "RecallRequest": pb.RecallRequest(space=FUZZ, cue=memory.embedding, k=5, min_score=0.1),
        "GetRequest": pb.GetRequest(space=FUZZ, id=rng.choice(POOL)),
        "ForgetRequest": pb.ForgetRequest(space=FUZZ, id=rng.choice(POOL)),
        "SubscribeRequest": pb.SubscribeRequest(space=FUZZ, since_lsn=rng.randrange(0, 30)),
        "ConsolidateRequest": pb.ConsolidateRequest(space=FUZZ),
        "CreateSpaceRequest": pb.CreateSpaceRequest(
            space="scratch-r", embedding_dim=DIM, tiers=pb.SpaceTiers(hot_capacity=10)
        ),
        "DeleteSpaceRequest": pb.DeleteSpaceRequest(space="scratch-r"),
        "ApplyIndexEntryRequest": pb.ApplyIndexEntryRequest(space="scratch-r", entry=""),
        "ListSpacesRequest": pb.ListSpacesRequest(),
        "BackupSpaceRequest": pb.BackupSpaceRequest(space=FUZZ, target=UNUSED_TARGET),
        "RestoreSpaceRequest": pb.RestoreSpaceRequest(
            space=FUZZ, target=UNUSED_TARGET, backup_id="b-1"
        ),
        "DeleteBackupRequest": pb.DeleteBackupRequest(
            space=FUZZ, target=UNUSED_TARGET, backup_id="b-1"
        ),
        "HealthRequest": pb.HealthRequest(space=FUZZ),
    }
    return bytes(examples[name].SerializeToString())


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption of a serialized message."""
    kind = rng.randrange(11)
    buffer = bytearray(data)
    if kind == 0 and buffer:
        for _ in range(rng.randint(1, 4)):
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del buffer[rng.randrange(len(buffer) + 1) :]
    elif kind == 2:
        at = rng.randrange(len(buffer) + 1)
        buffer[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3:
        buffer = buffer + buffer  # merged twice: still valid protobuf
    elif kind == 4:  # an unknown field of any wire type
        field = rng.choice([15, 99, 2**29 - 1, rng.randrange(1, 2**29)])
        wire = rng.randrange(6)
        buffer += varint(field << 3 | wire) + rng.randbytes(rng.randint(0, 12))
    elif kind == 5:  # a known field with the wrong wire type
        buffer += varint(1 << 3 | 0) + varint(rng.randrange(2**64))
    elif kind == 6:  # a length far beyond the message
        buffer += varint(rng.choice([1, 2, 3]) << 3 | 2) + varint(rng.choice([2**31, 2**35, 2**63]))
    elif kind == 7:  # an overlong varint
        buffer += b"\x08" + b"\xff" * rng.randint(10, 40)
    elif kind == 8:  # deeply nested groups
        depth = rng.choice([50, 200, 5000])
        buffer += varint(99 << 3 | 3) * depth + varint(99 << 3 | 4) * depth
    elif kind == 9:  # a packed float field whose length is not a multiple of 4
        buffer += varint(2 << 3 | 2) + varint(7) + rng.randbytes(7)
    else:
        buffer = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(buffer)


def random_metadata(rng: random.Random, method: str) -> tuple[Naming, list[tuple[str, Any]]]:
    """Usually what opens the fuzz space (or the admin's), so that payloads are parsed and
    checked deeply; otherwise random metadata: the space and token headers as a Naming, and
    other pairs (random keys, binary values, oversized values)."""
    if rng.random() < 0.6:
        admin = "SpaceService" in method and method.rsplit("/", 1)[1] not in BACKUP_CALLS
        token = ADMIN_TOKEN if admin else TOKENS[FUZZ]
        return Naming(auth=(f"Bearer {token}",)), []
    headers: list[str] = []
    auth: list[str] = []
    extra: list[tuple[str, Any]] = []
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_."
    printable = "".join(chr(c) for c in range(0x20, 0x7F))
    for _ in range(rng.randint(0, 4)):
        which = rng.randrange(6)
        if which == 0:
            headers.append(rng.choice([FUZZ, BYSTANDER, "", "X", "a" * 70]))
        elif which == 1:
            auth.append(rng.choice([f"Bearer {TOKENS[FUZZ]}", "Bearer", "bearer x", "x" * 200]))
        elif which == 2:
            key = "x-" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
            extra.append((key, "".join(rng.choice(printable) for _ in range(rng.randint(0, 50)))))
        elif which == 3:
            extra.append(("x-fuzz-bin", rng.randbytes(rng.randint(0, 64))))
        elif which == 4:
            extra.append(("x-request-id", "".join(rng.choice(printable) for _ in range(300))))
        else:
            extra.append(("x-huge", "h" * rng.choice([9000, 20000])))
    return Naming(tuple(headers), "", tuple(auth)), extra


@pytest.mark.timeout(soak(300, 1800))
def test_raw_bytes_and_random_metadata_get_section_5_codes_and_change_nothing(
    target: Target,
) -> None:
    seed = soak(7, random.randrange(2**32))
    rng = random.Random(seed)
    calls = soak(500, 8000)
    found = methods()
    seen: dict[str, set[str]] = {}
    for _ in range(calls):
        method, request_type, response_type, shape = rng.choice(found)
        if rng.random() < 0.02:
            payload = b"\x0a" + varint(MAX_MESSAGE) + bytes(MAX_MESSAGE)  # over the limit
        elif rng.random() < 0.15:
            payload = base_message(request_type, rng)
        else:
            payload = mutate(base_message(request_type, rng), rng)
        naming, extra = random_metadata(rng, method)
        try:
            parsed = request_type.FromString(payload)
        except Exception:
            parsed = None
        if parsed is not None and method.endswith("DeleteSpace"):
            routed = route(
                dataclasses.replace(naming, field=parsed.space), named=True, admin_only=True
            )
            if routed in PROTECTED:
                continue  # the fuzzer does not delete the spaces it checks
        # A stream the server must refuse is read to its end; one it may accept is a
        # subscription, hung up after a moment.
        refused = parsed is None or len(payload) > MAX_MESSAGE
        code, answer = raw_call(
            target.channel,
            method,
            shape,
            payload,
            [*naming.metadata(), *extra],
            CALL_TIMEOUT_S if refused else 0.2,
        )
        seen.setdefault(code.name, set()).add(method.rsplit("/", 1)[1])
        context = f"seed {seed}, {method}, {code}: {answer!r:.300}"
        assert code in SECTION_5, context
        if refused:
            allowed = {C.RESOURCE_EXHAUSTED}
            if len(payload) <= MAX_MESSAGE:
                allowed.add(C.INVALID_ARGUMENT)
            if shape == "stream-in" and naming.headers:
                # Named by metadata, a stream is routed before its first message is read.
                routed = route(naming)
                allowed |= {routed} if isinstance(routed, C) else set()
            assert code in allowed, context
        if code is C.OK:
            apply(target, method, parsed, answer, response_type, naming)
        else:
            target.rejected_call()
    target.check()
    assert {"OK", "INVALID_ARGUMENT"} <= set(seen), seen


def raw_call(
    channel: grpc.Channel,
    method: str,
    shape: str,
    payload: bytes,
    metadata: Sequence[tuple[str, Any]],
    hang_up_s: float,
) -> tuple[C, Any]:
    """Send raw bytes: no serializer on either side. A server stream still open after
    `hang_up_s` is cancelled and counts as accepted."""
    meta = tuple(metadata)
    try:
        if shape == "unary":
            answer = channel.unary_unary(method, None, None)(
                payload, metadata=meta, timeout=CALL_TIMEOUT_S
            )
        elif shape == "stream-in":
            answer = channel.stream_unary(method, None, None)(
                iter([payload, payload]), metadata=meta, timeout=CALL_TIMEOUT_S
            )
        else:
            answer = _read_stream(channel, method, payload, meta, hang_up_s)
    except grpc.RpcError as err:
        failed: Any = err  # also a grpc.Call
        return failed.code(), failed.details()
    return C.OK, answer


def _read_stream(
    channel: grpc.Channel,
    method: str,
    payload: bytes,
    metadata: tuple[tuple[str, Any], ...],
    hang_up_s: float,
) -> list[bytes]:
    """The messages of a server stream, until it ends or `hang_up_s` have passed."""
    call: Any = channel.unary_stream(method, None, None)(
        payload, metadata=metadata, timeout=CALL_TIMEOUT_S + 5
    )
    timer = threading.Timer(hang_up_s, call.cancel)
    timer.start()
    events: list[bytes] = []
    try:
        events.extend(call)
    except grpc.RpcError:
        if call.code() is not C.CANCELLED:
            raise
    finally:
        timer.cancel()
    return events


def apply(
    target: Target,
    method: str,
    parsed: Any,
    answer: Any,
    response_type: Any,
    naming: Naming,
) -> None:
    """Bring the model up to date with an accepted raw request: a write that reached the fuzz
    space (the oracle of `route` says where it went)."""
    name = method.rsplit("/", 1)[1]
    if name not in ("Remember", "RememberBatch", "Forget"):
        return
    if route(dataclasses.replace(naming, field=parsed.space)) != FUZZ:
        return
    done = response_type.FromString(answer)
    if name == "RememberBatch":
        events = []
        for memory_id in done.ids:
            target.ledger[memory_id] = stored(with_id(parsed.memory, memory_id))
            events.append((pb.EVENT_TYPE_REMEMBERED, memory_id))
        target.wrote(done.last_lsn, events)
    elif name == "Remember":
        target.ledger[done.id] = stored(with_id(parsed.memory, done.id))
        target.wrote(done.lsn, [(pb.EVENT_TYPE_REMEMBERED, done.id)])
    elif done.forgotten:
        del target.ledger[parsed.id]
        target.wrote(done.lsn, [(pb.EVENT_TYPE_FORGOTTEN, parsed.id)])
