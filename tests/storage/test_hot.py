"""The hot tier's block store: a tier spanning many blocks answers like one matrix."""

from __future__ import annotations

import numpy as np
import pytest

from memspace_server.storage import hot, pages, tiers

DIM = 8


def _batch(ids: list[str], embeddings: np.ndarray) -> tiers.Columns:
    count = len(ids)
    return tiers.Columns(
        ids=ids,
        contents=[f"text of {i}" for i in ids],
        embeddings=embeddings,
        confidence=np.ones(count, np.float32),
        tags=[{"even": "yes"} if int(i[1:]) % 2 == 0 else {} for i in ids],
        created_at=np.ones(count),
        last_recalled_at=np.zeros(count),
        recall_count=np.zeros(count, np.uint64),
    )


@pytest.mark.parametrize("ahead_rows", [0, 700], ids=["no-fault-ahead", "fault-ahead"])
def test_a_hot_tier_over_many_blocks_matches_a_plain_matrix(
    monkeypatch: pytest.MonkeyPatch, ahead_rows: int
) -> None:
    monkeypatch.setattr(hot, "BLOCK_BYTES", 4 * DIM * 1024)  # 1024 rows a block
    # Pages of the rows ahead of the last written are populated in the background meanwhile
    # (0: never): the rows written stay as they are.
    monkeypatch.setattr(hot, "AHEAD_BYTES", 4 * DIM * ahead_rows or 1 << 40)
    monkeypatch.setattr(hot, "STEP_BYTES", 4 * DIM * 100)
    rng = np.random.default_rng(5)
    tier = hot.HotTier(DIM)
    model: dict[str, np.ndarray] = {}
    created = 0
    for step in range(400):
        if rng.random() < 0.6 or not model:
            count = int(rng.integers(1, 300))
            ids = [f"m{created + i}" for i in range(count)]
            created += count
            embeddings = rng.normal(size=(count, DIM)).astype(np.float32)
            if rng.random() < 0.1:
                tier.reserve(count)
            tier.add(_batch(ids, embeddings))
            model.update(zip(ids, embeddings, strict=True))
        else:
            for key in rng.choice(list(model), size=min(len(model), 150), replace=False):
                assert tier.remove(str(key))
                del model[str(key)]
        if step % 40 == 0 and model:
            cue = tiers.unit(rng.normal(size=DIM).astype(np.float32))
            ids = list(model)
            matrix = np.stack([model[i] for i in ids])
            scores = (matrix @ cue) / np.linalg.norm(matrix, axis=1)
            assert [i for _, i in tier.top_k(cue, 5, -1.0, {})] == [
                ids[i] for i in np.argsort(-scores)[:5]
            ]
            even = [k for k, i in enumerate(ids) if int(i[1:]) % 2 == 0]
            assert [i for _, i in tier.top_k(cue, 3, -1.0, {"even": "yes"})] == [
                ids[even[i]] for i in np.argsort(-scores[even])[:3]
            ]
            everything = tier.all_rows()
            assert sorted(everything.ids) == sorted(model)
            for i, key in enumerate(everything.ids):
                assert np.array_equal(everything.embeddings[i], model[key])
            some = ids[: min(20, len(ids))]
            for key in some:
                found = tier.get(key)
                assert found is not None
                assert np.array_equal(found.embedding, model[key])
    assert len(tier._emb.blocks) > 3


def test_faulting_pages_ahead_leaves_what_they_hold_alone() -> None:
    rng = np.random.default_rng(9)
    array = np.zeros((4096, 256), np.float32)
    written = rng.normal(size=(2048, 256)).astype(np.float32)
    array[:2048] = written
    for start in range(0, array.nbytes, 123_457):
        pages.ahead(array, start, min(array.nbytes, start + 300_000))
    array[2048:3000] = written[:952]
    pages.settled()
    assert np.array_equal(array[:2048], written)
    assert np.array_equal(array[2048:3000], written[:952])
    assert not array[3000:].any()


def test_the_product_kernel_matches_numpy_for_any_layout() -> None:
    rng = np.random.default_rng(4)
    matrix = rng.normal(size=(3000, 48)).astype(np.float32)
    assert matrix.size >= tiers.SMALL_PRODUCT  # the whole matrix goes to faiss's kernel
    cue = rng.normal(size=48).astype(np.float32)
    for rows, vector in (
        (matrix, cue),
        (matrix[::2], cue),  # strided rows: numpy answers
        (matrix[:, :24], cue[:24]),
        (matrix[:0], cue),
        (matrix[:10], cue),  # small: numpy answers
        (np.asfortranarray(matrix), cue),
    ):
        out = np.empty(rows.shape[0], np.float32)
        tiers.products(rows, vector, out)
        np.testing.assert_allclose(out, rows @ vector, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="output"):
        tiers.products(matrix, cue, np.empty(3, np.float32))


def test_stacked_products_match_numpy_over_blocks_of_any_size() -> None:
    rng = np.random.default_rng(5)
    matrix = rng.normal(size=(9000, 48)).astype(np.float32)
    cue = rng.normal(size=48).astype(np.float32)
    # Blocks the kernel takes and small ones numpy takes; the last is cut to the output.
    blocks = [matrix[:3000], matrix[3000:3010], matrix[3010:6010], matrix[6010:]]
    for rows in (9000, 6500, 3005, 0):
        out = np.empty(rows, np.float32)
        tiers.stacked_products(blocks, cue, out)
        np.testing.assert_allclose(out, matrix[:rows] @ cue, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="fewer"):
        tiers.stacked_products(blocks[:2], cue, np.empty(4000, np.float32))


def test_an_object_column_keeps_its_values_like_a_list() -> None:
    column = tiers.ObjectColumn(["a", "b"])
    mirror: list[object] = ["a", "b"]
    for step in range(100):  # past its first capacity, growing
        column.append(f"v{step}")
        mirror.append(f"v{step}")
    column.extend([{"tag": "x"}, {}, "last"])
    mirror.extend([{"tag": "x"}, {}, "last"])
    column[3] = "changed"
    mirror[3] = "changed"
    assert column.pop() == mirror.pop() == "last"
    assert len(column) == len(mirror) == 104
    assert column.tolist() == list(column) == mirror
    assert column.take(np.array([102, 0, 3])) == [{"tag": "x"}, "a", "changed"]
    assert column.take([]) == []
    for row in (104, -1):
        with pytest.raises(IndexError):
            column[row]
        with pytest.raises(IndexError):
            column.take([0, row])
    empty = tiers.ObjectColumn()
    with pytest.raises(IndexError):
        empty.pop()


def test_a_memory_stays_unsaved_until_a_checkpoint_holds_it_wherever_its_row_moves() -> None:
    tier = hot.HotTier(DIM)
    rng = np.random.default_rng(7)
    tier.add(_batch(["m0", "m1", "m2"], rng.normal(size=(3, DIM)).astype(np.float32)))
    assert tier.unsaved_ids() == ["m0", "m1", "m2"]
    tier.mark_saved()
    assert tier.unsaved_ids() == []
    tier.add(_batch(["m3", "m4"], rng.normal(size=(2, DIM)).astype(np.float32)))
    tier.remove("m0")  # the last row (m4) moves into m0's: its flag goes with it
    assert tier.unsaved_ids() == ["m4", "m3"]
    tier.remove("m3")  # forgotten before any checkpoint: nothing left to save of it
    assert tier.unsaved_ids() == ["m4"]
    tier.add(_batch(["m5"], rng.normal(size=(1, DIM)).astype(np.float32)))
    tier.mark_saved(["m4", "gone"])  # a memory removed meanwhile is passed over
    assert tier.unsaved_ids() == ["m5"]
    tier.remove("m1")  # m5 moves into the saved row of m1: still unsaved
    assert tier.unsaved_ids() == ["m5"]
