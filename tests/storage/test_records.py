"""WAL record payloads: one decoder of a remember record serves replay's columns and single
records alike."""

from __future__ import annotations

import numpy as np
import pytest

from memspace_server.storage import memories, records


def memory(memory_id: str, dim: int, tags: dict[str, str] | None = None) -> memories.Memory:
    return memories.Memory(
        id=memories.MemoryId(memory_id),
        content=f"content of {memory_id} é",
        embedding=np.arange(dim, dtype=np.float32) + 0.5,
        confidence=0.75,
        tags=tags or {},
        created_at=1234.5,
    )


def test_columns_and_decode_read_a_remember_record_alike() -> None:
    written = [memory("a", 4, {"k": "v"}), memory("b", 4)]
    payloads = [
        memoryview(records.encode_remember(lsn, 99.0, m)) for lsn, m in enumerate(written, 1)
    ]
    batch = records.columns(payloads, 4)
    for row, payload in enumerate(payloads):
        decoded = records.decode(payload)
        assert isinstance(decoded, records.Remembered)
        one = decoded.memory
        assert (one.id, one.content, one.tags) == (
            batch.ids[row],
            batch.contents[row],
            batch.tags[row],
        )
        assert one.confidence == batch.confidence[row]
        assert one.created_at == batch.created_at[row]
        np.testing.assert_array_equal(one.embedding, batch.embeddings[row])
        assert one.id == written[row].id


def test_a_record_of_another_dimension_is_refused_by_replay() -> None:
    payload = memoryview(records.encode_remember(1, 0.0, memory("a", 3)))
    with pytest.raises(records.RecordFormatError, match="holds 3 values, the space 4"):
        records.columns([payload], 4)


def test_trailing_bytes_are_refused_by_both_readers() -> None:
    payload = memoryview(records.encode_remember(1, 0.0, memory("a", 4)) + b"junk")
    with pytest.raises(records.RecordFormatError, match="wrong length"):
        records.decode(payload)
    with pytest.raises(records.RecordFormatError, match="wrong length"):
        records.columns([payload], 4)
