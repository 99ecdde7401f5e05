"""HNSW and quantization for real (issue 10): an embedded collection past its threshold gets an HNSW
graph from the engine's optimiser, eval's recall of Qdrant against FAISS is the number the answers
really have (and it moves with ef and quantization), and settings a backend cannot honour are refused
in one line. Real qdrant-edge on disk; qdrant-client's in-process mode for the server code path."""

import numpy as np
import pytest

from m3d.connector import IndexSettings, SearchSettings
from m3d.errors import StoreError, UsageError
from m3d.evaluate import evaluate_collection
from m3d.store import open_session

from test_faiss_trust import _points

NAME = "m3d_t_mean"


def _random_collection(session, n, dim, index, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids, _, payloads = _points(0, n)
    session.vectors.ensure_collection(NAME, dim, index)
    for lo in range(0, n, 500):
        session.upsert(NAME, ids[lo:lo + 500], vectors[lo:lo + 500], payloads[lo:lo + 500])
    session.finish(NAME)
    return ids, vectors


def _measured_recall(session, index, queries, k, params):
    """Recall@k of Qdrant's answers against FAISS's, computed here without evaluate's code."""
    _, exact = index.search(queries, k)
    answers = session.vectors.search(NAME, queries, k, params=params)
    return float(np.mean([len({h.id for h in a} & set(e)) / k for a, e in zip(answers, exact)]))


def test_hnsw_indexed_collection_answers_like_faiss_within_the_reported_recall(tmp_path):
    with open_session(tmp_path / "s") as session:
        _random_collection(session, 3000, 48, IndexSettings(index_threshold=100, hnsw_m=4, hnsw_ef_construct=8))
        info = session.vectors.index_info(NAME)
        assert info.indexed == info.points == 3000 and info.state.startswith("hnsw m=4")
        low, high = SearchSettings(hnsw_ef=10), SearchSettings(hnsw_ef=400)
        result = evaluate_collection(session, NAME, recall_k=10, recall_queries=300, latency_queries=20,
                                     search=(low, high))
        reported = {p["hnsw_ef"]: p["recall"] for p in result.sweep}
        index = session.exact(NAME)
        sample = np.linspace(0, 2999, num=300, dtype=int)
        # queries are stored points: drop each one's self-hit the way eval does, by asking for k + 1
        for params in (low, high):
            queries = index.vectors[sample]
            _, exact = index.search(queries, 11)
            answers = session.vectors.search(NAME, queries, 11, params=params)
            own = [index.ids[r] for r in sample]
            measured = np.mean([len({h.id for h in a if h.id != o}.intersection([e for e in ex if e != o][:10])) / 10
                                for a, ex, o in zip(answers, exact, own)])
            assert reported[params.hnsw_ef] == pytest.approx(measured, abs=0.02)
        assert reported[10] < 0.99  # a sparse graph searched narrowly misses neighbours: the number is real
        assert reported[400] > reported[10] and reported[400] > 0.9
        assert result.indexed == 3000 and isinstance(result.row()["recall@10 ef=10"], float)


def test_quantized_collection_reports_recall_below_one_and_rescoring_moves_it(tmp_path):
    with open_session(tmp_path / "s") as session:
        _random_collection(session, 1500, 32, IndexSettings(index_threshold=0, quantization="binary"))
        index = session.exact(NAME)
        queries = index.vectors[:200]
        plain = _measured_recall(session, index, queries, 10, SearchSettings(hnsw_ef=256, rescore=False))
        rescored = _measured_recall(session, index, queries, 10, SearchSettings(hnsw_ef=256, rescore=True,
                                                                               oversampling=4.0))
        result = evaluate_collection(session, NAME, recall_queries=200, latency_queries=5,
                                     search=(SearchSettings(hnsw_ef=256, rescore=False),))
        assert result.recall < 0.9 and plain < 0.9  # 1 bit per dimension of 32: far from exact
        assert rescored > plain + 0.1
        assert "binary" in result.index


def test_no_index_says_so_instead_of_a_perfect_recall(tmp_path):
    with open_session(tmp_path / "s") as session:
        _random_collection(session, 300, 16, IndexSettings())  # below the default threshold
        result = evaluate_collection(session, NAME, recall_queries=50, latency_queries=5)
        assert result.indexed == 0 and result.recall == 1.0
        assert result.row()["recall@10"] == "exact (no index)" and result.index == "none (exact scan)"


def test_settings_a_backend_cannot_honour_or_that_differ_are_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="--shards, --replication-factor need a Qdrant server"):
        IndexSettings(shards=2, replication_factor=2).check_backend(server=False)
    with pytest.raises(UsageError, match="unknown quantization 'int4'"):
        IndexSettings(quantization="int4")
    with pytest.raises(UsageError, match="--write-consistency 3 is more than the 2 replicas"):
        IndexSettings(replication_factor=2, write_consistency=3)
    with open_session(tmp_path / "s") as session:
        session.vectors.ensure_collection(NAME, 16, IndexSettings(hnsw_m=8))
        session.vectors.ensure_collection(NAME, 16, IndexSettings())  # nothing asked: keeps what it has
        with pytest.raises(StoreError, match=r"hnsw_m: 8 -> 32.*--rebuild"):
            session.vectors.ensure_collection(NAME, 16, IndexSettings(hnsw_m=32))


def test_server_collections_record_their_settings_and_take_search_params(tmp_path):
    """qdrant-client's local mode stores the collection (and our metadata) but builds no HNSW graph
    and does not quantize: there the settings are recorded and passed, and the index stays 'none'."""
    asked = IndexSettings(hnsw_m=32, quantization="int8", on_disk=True, shards=2, replication_factor=2,
                          write_consistency=2, index_threshold=0)
    with open_session(tmp_path / "s", url=":memory:") as session:
        ids, vectors = _random_collection(session, 200, 16, asked)
        info = session.vectors.index_info(NAME)
        assert info.settings == asked.resolved() and info.points == 200
        hits = session.vectors.search(NAME, vectors[:3], 5, params=SearchSettings(hnsw_ef=64, rescore=True))
        assert [h[0].id for h in hits] == ids[:3]
        with pytest.raises(StoreError, match="shards: 2 -> 4"):
            session.vectors.ensure_collection(NAME, 16, IndexSettings(shards=4))
