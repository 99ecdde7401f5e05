"""The FAISS index's file (connector/exact.py): rows written in place, a sorted id snapshot plus the
changes since, capacity grown by a streamed copy. Checked against a plain dict after random adds,
replacements (repeats inside one batch too) and removals, with the fold and copy sizes made tiny so
every path runs; and a write that never committed is never read as current."""

import numpy as np
import pytest

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


def test_a_refused_batch_changes_nothing(tmp_path):
    """An id that cannot be stored (not a UUID) refuses the whole batch before any row moves: the other
    new ids of that batch are unknown afterwards, and removing one of them touches nothing."""
    rows = np.eye(DIM, dtype=np.float32)[:4]
    index = ExactIndex.build(tmp_path, "m3d_t_mean", DIM, "m3d_t_mean")
    index.upsert([_pid(i) for i in range(3)], rows[:3])
    try:
        index.upsert([_pid(7), "x" * 40], rows[:2])
    except ValueError:
        pass
    else:
        raise AssertionError("an id of 40 characters was stored")
    assert index.row(_pid(7)) is None and len(index) == 3
    index.remove([_pid(7)])
    index.commit("g1")
    index.move_to(tmp_path, "m3d_t_mean")
    saved = ExactIndex.load(tmp_path, "m3d_t_mean")
    assert saved.ids == [_pid(i) for i in range(3)] and saved.generation == "g1"
    np.testing.assert_array_equal(saved.vectors, rows[:3])


def test_a_growth_that_fails_leaves_the_index_and_no_partial_file(tmp_path):
    """The file may not grow (a real limit: RLIMIT_FSIZE, as a full disk would refuse): the upsert that
    needs room fails, the index keeps its rows and answers, and no `.grow` file is left."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from pathlib import Path
        from m3d.connector.exact import ExactIndex
        pid = lambda i: f"{{i:08x}}-0000-4000-8000-000000000000"
        root = Path(sys.argv[1])
        index = ExactIndex.build(root, "m3d_t_mean", {DIM}, "m3d_t_mean")
        index.upsert([pid(i) for i in range(16)], np.eye({DIM}, dtype=np.float32)[np.arange(16) % {DIM}])
        index.move_to(root, "m3d_t_mean")
        index.commit("g1")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        size = (root / "m3d_t_mean.faiss").stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, size + 100))
        try:
            index.upsert([pid(100)], np.ones((1, {DIM}), np.float32))
        except OSError as exc:
            print("refused", exc.errno)
        print("rows", len(index), index.search(np.eye({DIM}, dtype=np.float32)[:1], 1)[1][0][0] == pid(0))
        print("files", sorted(p.name for p in root.iterdir()))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused") and lines[1] == "rows 16 True", out.stdout
    assert lines[2] == "files ['m3d_t_mean.faiss']", out.stdout
    saved = ExactIndex.load(tmp_path, "m3d_t_mean")
    assert len(saved) == 16 and saved.generation is None  # the failed change cleared it: rebuilt, never trusted


def _gpu_skip_reason() -> str:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return "this faiss build has no GPU support (faiss-cpu; install faiss-gpu on a GPU machine)"
    return "faiss-gpu sees no GPU"


def _assert_exact_knn(index: ExactIndex, rows: np.ndarray, queries: np.ndarray, k: int) -> None:
    """The answer is an exact top k: every returned id scores what was returned, and the k scores are
    numpy's k best (ties may order ids differently; float sums differ by rounding only)."""
    scores, ids = index.search(queries, k)
    truth = queries @ rows.T
    best = -np.sort(-truth, axis=1)[:, :k]
    np.testing.assert_allclose(scores, best, atol=1e-4)
    for q, row_ids in enumerate(ids):
        assert len(set(row_ids)) == k
        np.testing.assert_allclose([truth[q, int(i)] for i in row_ids], scores[q], atol=1e-4)


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_cpu_search_is_an_exact_top_k(tmp_path):
    rows, queries = _unit(3000, 96, 1), _unit(40, 96, 2)
    index = ExactIndex([str(i) for i in range(len(rows))], rows, path=tmp_path / "x.faiss", generation="g")
    _assert_exact_knn(index, rows, queries, 10)


@pytest.mark.skipif(exact.faiss_gpus() == 0, reason=_gpu_skip_reason())
def test_gpu_search_is_an_exact_top_k_on_the_gpu(tmp_path, monkeypatch):
    """Where a faiss-gpu build sees a GPU, the exact side searches there (faiss.knn_gpu): the CPU's
    faiss.knn is made to fail, and the answers are still numpy's exact top k."""
    import faiss

    def cpu_knn(*args, **kwargs):
        raise AssertionError("faiss.knn (CPU) was called with a GPU available")

    monkeypatch.setattr(faiss, "knn", cpu_knn)
    rows, queries = _unit(20000, 512, 3), _unit(300, 512, 4)
    index = ExactIndex([str(i) for i in range(len(rows))], rows, path=tmp_path / "x.faiss", generation="g")
    for k in (1, 10, 100):
        _assert_exact_knn(index, rows, queries, k)
