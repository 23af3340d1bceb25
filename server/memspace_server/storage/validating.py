"""A write batch validated as columns: the rules of `memories.validate_draft`, checked for a whole
RememberBatch (or a group of Remembers) with one matrix for the embeddings and one call for the
random ids, so a write costs a few numpy calls instead of a Python object per memory."""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence

import numpy as np

from memspace_server import errors
from memspace_server.storage import memories, tiers


def _embeddings(drafts: Sequence[memories.Draft], dim: int) -> np.ndarray:
    try:
        # One call over the list (about 4x faster than stacking each draft's array).
        matrix = np.array([d.embedding for d in drafts], dtype=np.float32)
    except (TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.ndim != 2 or matrix.shape[1] != dim:
        # Some draft is malformed: the one-at-a-time check names it and the rule it breaks.
        for draft in drafts:
            memories.check_vector(draft.embedding, dim, "embedding")
        raise errors.InvalidMemoryError("embeddings must be lists of numbers")
    matrix = np.ascontiguousarray(matrix)
    with np.errstate(over="ignore", invalid="ignore"):
        squares = tiers.squared_norms(matrix)
    if not (np.isfinite(squares).all() and squares.all()):
        for draft in drafts:
            memories.check_vector(draft.embedding, dim, "embedding")
    return matrix


_CONFIDENCE = operator.attrgetter("confidence")
_CREATED = operator.attrgetter("created_at")
_CONTENT = operator.attrgetter("content")
_ID = operator.attrgetter("id")
_TAGS = operator.attrgetter("tags")


def _check_content(content: str) -> None:
    if len(content) * 4 > memories.MAX_CONTENT_BYTES or not content.isascii():
        # Long or not ASCII: measure its UTF-8 bytes (and refuse lone surrogates).
        size = len(content.encode("utf-8", "surrogatepass"))
        if size > memories.MAX_CONTENT_BYTES:
            raise errors.InvalidMemoryError(
                f"content is {size} bytes; at most {memories.MAX_CONTENT_BYTES} (64 KiB)"
            )
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:
            raise errors.InvalidMemoryError("content must be valid UTF-8 text") from err


def fresh_ids(count: int) -> list[str]:
    """`count` new IDs of 128 random bits, from one call for randomness, cut into IDs by numpy
    from 16 on (3 µs for 32 against 5 for a slice each; below, the slices are quicker)."""
    random = os.urandom(16 * count).hex()
    if count < 16:
        return [random[i : i + 32] for i in range(0, 32 * count, 32)]
    ids: list[str] = np.array(random).reshape(1).view("<U32").tolist()
    return ids


def _one(draft: memories.Draft, dim: int, now: float) -> tiers.Columns:
    """`validate` of a single draft (a Remember): the same rules, checked on scalars."""
    confidence = float(draft.confidence)
    if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
        raise errors.InvalidMemoryError(f"confidence is {confidence}; allowed 0..1")
    created = float(draft.created_at) or now
    if not (math.isfinite(created) and created >= 0):
        raise errors.InvalidMemoryError(f"created_at {created} is not a valid time")
    _check_content(draft.content)
    embedding = memories.check_vector(draft.embedding, dim, "embedding")
    return tiers.Columns(
        ids=[memories.check_id(draft.id) if draft.id else fresh_ids(1)[0]],
        contents=[draft.content],
        embeddings=embedding[None, :],
        confidence=np.array([confidence], np.float32),
        tags=[memories.check_tags(draft.tags) if draft.tags else {}],
        created_at=np.array([created], np.float64),
        last_recalled_at=np.zeros(1, np.float64),
        recall_count=np.zeros(1, np.uint64),
    )


def validate(drafts: Sequence[memories.Draft], dim: int, now: float) -> tiers.Columns:
    """Check every draft against the rules of a space (as `memories.validate_draft` does, with
    the same messages); return the batch to store, ids assigned where a draft has none."""
    count = len(drafts)
    if count == 1:
        return _one(drafts[0], dim, now)
    embeddings = _embeddings(drafts, dim) if count else np.zeros((0, dim), np.float32)
    confidence = np.fromiter(map(_CONFIDENCE, drafts), np.float64, count)
    if not (np.isfinite(confidence).all() and (confidence >= 0).all() and (confidence <= 1).all()):
        bad = next(float(c) for c in confidence if not (math.isfinite(c) and 0.0 <= c <= 1.0))
        raise errors.InvalidMemoryError(f"confidence is {bad}; allowed 0..1")
    created = np.fromiter(map(_CREATED, drafts), np.float64, count)
    created[created == 0] = now
    if not (np.isfinite(created).all() and (created >= 0).all()):
        bad = next(float(c) for c in created if not (math.isfinite(c) and c >= 0))
        raise errors.InvalidMemoryError(f"created_at {bad} is not a valid time")
    contents = list(map(_CONTENT, drafts))
    longest = max(map(len, contents), default=0)
    # All ASCII (`str.isascii` is O(1)) and short enough counted in characters: nothing to
    # measure one by one.
    if not ("".join(contents).isascii() and longest <= memories.MAX_CONTENT_BYTES):
        for content in contents:
            _check_content(content)
    given = list(map(_ID, drafts))
    missing = given.count("")
    ids: list[str]
    if missing == count:
        ids = fresh_ids(count)
    else:
        fresh = iter(fresh_ids(missing))
        ids = [memories.check_id(i) if i else next(fresh) for i in given]
    given_tags = list(map(_TAGS, drafts))
    if any(given_tags):
        tags = [memories.check_tags(t) if t else {} for t in given_tags]
    else:
        tags = [{} for _ in range(count)]
    return tiers.Columns(
        ids=ids,
        contents=contents,
        embeddings=embeddings,
        confidence=confidence.astype(np.float32),
        tags=tags,
        created_at=created,
        last_recalled_at=np.zeros(count, np.float64),
        recall_count=np.zeros(count, np.uint64),
    )
