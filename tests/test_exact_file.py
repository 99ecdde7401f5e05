"""The FAISS index's file (connector/exact.py): rows written in place, a sorted id snapshot plus the
changes since, capacity grown by a streamed copy. Checked against a plain dict after random adds,
replacements (repeats inside one batch too) and removals, with the fold and copy sizes made tiny so
every path runs; and a write that never committed is never read as current."""

import numpy as np

from m3d.connector import exact
from m3d.connector.exact import ExactIndex

DIM = 6


def _pid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-000000000000"


def test_rows_match_a_dict_after_random_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(exact, "FOLD", 7)  # the snapshot is rebuilt many times
    monkeypatch.setattr(exact, "CHUNK_BYTES", 3 * 4 * DIM)  # growth copies 3 rows at a time
    rng = np.random.default_rng(0)
    model: dict[str, np.ndarray] = {}
    index = ExactIndex.build(tmp_path, "m3d_t_mean", DIM, "m3d_t_mean")
    for step in range(60):
        if step % 3 == 2 and model:
            gone = list(rng.choice(sorted(model), size=min(len(model), 4), replace=False)) + [_pid(10**6)]
            index.remove(gone)
            for pid in gone:
                model.pop(pid, None)
        else:
            ids = [_pid(int(i)) for i in rng.integers(0, 120, size=9)]  # repeats: the last one wins
            vectors = rng.normal(size=(9, DIM)).astype(np.float32)
            index.upsert(ids, vectors)
            model.update(zip(ids, vectors))
        assert len(index) == len(model)
    assert sorted(index.ids) == sorted(model)
    for pid, vector in model.items():
        np.testing.assert_array_equal(index.vectors[index.row(pid)], vector)
    assert index.row(_pid(10**6)) is None
    index.commit("g1")
    index.move_to(tmp_path, "m3d_t_mean")
    loaded = ExactIndex.load(tmp_path, "m3d_t_mean")
    assert (loaded.generation, loaded.collection, len(loaded)) == ("g1", "m3d_t_mean", len(model))
    assert {pid: loaded.vectors[loaded.row(pid)].tolist() for pid in model} == {p: v.tolist() for p, v in model.items()}


def test_rows_changed_without_a_commit_describe_no_generation(tmp_path):
    ids = [_pid(i) for i in range(5)]
    ExactIndex(ids, np.eye(5, DIM, dtype=np.float32), collection="m3d_t_mean", generation="g1",
               path=tmp_path / "m3d_t_mean.faiss")
    index = ExactIndex.load(tmp_path, "m3d_t_mean")
    assert index.generation == "g1"
    index.upsert(ids[:1], -np.eye(1, DIM, dtype=np.float32))  # a sync killed before its commit
    assert ExactIndex.load(tmp_path, "m3d_t_mean").generation is None  # never trusted: rebuilt
    index.commit("g2")
    again = ExactIndex.load(tmp_path, "m3d_t_mean")
    assert again.generation == "g2" and again.vectors[again.row(ids[0])][0] == -1.0
