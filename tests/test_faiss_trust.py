"""FAISS answers only for what Qdrant holds now (issue 9 item 3, issue 10 item 4): kept in step row by
row as Qdrant changes, and rebuilt (one warning line) whenever its generation, collection or rows do not
match: a file copied from another collection, an older Qdrant directory restored, another writer's
in-place update. Real engines: qdrant-edge on disk and qdrant-client's in-process mode."""

import logging
import shutil

import numpy as np
import pytest

from m3d.connector.exact import ExactIndex
from m3d.connector.lock import StoreLock
from m3d.connector.server import ServerStore
from m3d.dataset import point_id
from m3d.store import Session, open_session

DIM = 16


def _points(lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(hi, DIM)).astype(np.float32)[lo:]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [point_id("d", f"c{i % 3}/obj_{i}.off") for i in range(lo, hi)]
    payloads = [{"class": f"c{i % 3}", "split": None, "path": f"c{i % 3}/obj_{i}.off", "dataset": "d"} for i in range(lo, hi)]
    return ids, vectors, payloads


def _rows(index):
    """id -> row: the comparison of two indexes row for row, whatever their row order."""
    return {pid: index.vectors[index.row(pid)].copy() for pid in index.ids}


def _qdrant_rows(session, name):
    return {r.id: r.vector for r in session.vectors.records(name, vectors=True)}


def _assert_same(rows, expected):
    assert rows.keys() == expected.keys()
    for pid, vector in expected.items():
        np.testing.assert_allclose(rows[pid], vector, atol=1e-6)


@pytest.fixture(params=["edge", "server"])
def session(request, tmp_path):
    url = ":memory:" if request.param == "server" else None
    with open_session(tmp_path / "store", url=url) as opened:
        opened.vectors.ensure_collection("m3d_t_mean", DIM)
        yield opened


def test_incremental_faiss_equals_a_full_rebuild_after_adds_updates_deletes(session):
    name = "m3d_t_mean"
    ids, vectors, payloads = _points(0, 300)
    for lo in range(0, 300, 70):  # adds in several batches
        session.upsert(name, ids[lo:lo + 70], vectors[lo:lo + 70], payloads[lo:lo + 70])
    _, new_vectors, _ = _points(0, 300, seed=1)
    changed = list(range(5, 300, 7))
    session.upsert(name, [ids[i] for i in changed], new_vectors[changed], [payloads[i] for i in changed])  # updates
    session.delete(name, ids[:40] + ids[250:260] + ["00000000-0000-0000-0000-000000000000"])  # deletes (+ unknown)
    more_ids, more_vectors, more_payloads = _points(300, 330)
    session.upsert(name, more_ids, more_vectors, more_payloads)  # adds after deletes reuse the freed rows
    incremental = session.save_exact(name)
    assert len(incremental) == session.vectors.count(name) == 330 - 50
    _assert_same(_rows(incremental), _qdrant_rows(session, name))

    rebuilt = session.rebuild_exact(name)
    _assert_same(_rows(incremental), _rows(rebuilt))
    queries = new_vectors[changed[:20]]
    assert incremental.search(queries, 10)[1] == rebuilt.search(queries, 10)[1]
    # the saved file is trusted by the next reader without a rebuild: same generation, same rows
    saved = ExactIndex.load(session.exact_dir, name)
    assert saved.generation == session.vectors.generation(name) is not None
    _assert_same(_rows(saved), _rows(rebuilt))


def _one_warning(caplog):
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    return warnings[0]


def test_faiss_copied_over_another_collections_is_rebuilt(tmp_path, caplog):
    with open_session(tmp_path / "s") as session:
        for seed, name in enumerate(["m3d_a_mean", "m3d_b_mean"]):
            session.vectors.ensure_collection(name, DIM)
            ids, vectors, payloads = _points(0, 50, seed=seed)  # same ids, other vectors
            session.upsert(name, ids, vectors, payloads)
            session.save_exact(name)
    shutil.copyfile(tmp_path / "s" / "faiss" / "m3d_a_mean.faiss", tmp_path / "s" / "faiss" / "m3d_b_mean.faiss")
    with open_session(tmp_path / "s") as session:
        rows = {r["collection"]: r for r in session.check()}
        assert rows["m3d_a_mean"]["ok"] and not rows["m3d_b_mean"]["in_step"]
        with caplog.at_level(logging.WARNING, logger="m3d"):
            index = session.exact("m3d_b_mean")
        assert "made for collection m3d_a_mean" in _one_warning(caplog)
        _assert_same(_rows(index), _qdrant_rows(session, "m3d_b_mean"))


def test_an_older_qdrant_directory_restored_is_never_answered_from_newer_faiss(tmp_path, caplog):
    store = tmp_path / "s"
    name = "m3d_t_mean"
    ids, vectors, payloads = _points(0, 80)
    with open_session(store) as session:
        session.vectors.ensure_collection(name, DIM)
        session.upsert(name, ids[:60], vectors[:60], payloads[:60])
        session.save_exact(name)
    shutil.copytree(store / "qdrant", tmp_path / "backup")
    _, moved, _ = _points(0, 80, seed=5)
    with open_session(store) as session:  # same count afterwards: 20 updated in place, 20 added, 20 deleted
        session.upsert(name, ids[:20], moved[:20], payloads[:20])
        session.upsert(name, ids[60:], vectors[60:], payloads[60:])
        session.delete(name, ids[40:60])
        session.save_exact(name)
        assert session.vectors.count(name) == 60
    shutil.rmtree(store / "qdrant")
    shutil.copytree(tmp_path / "backup", store / "qdrant")
    with open_session(store) as session:
        with caplog.at_level(logging.WARNING, logger="m3d"):
            index = session.exact(name)
        assert "another generation" in _one_warning(caplog)
        _assert_same(_rows(index), {pid: vectors[i] for i, pid in enumerate(ids[:60])})
        assert all(row["ok"] for row in session.check())


def _shared_server_sessions(tmp_path):
    """Two machines (two store directories, each with its own FAISS) writing to one Qdrant server."""
    server = ServerStore(":memory:")
    server.close = lambda: None  # both sessions share the one in-process server
    return [Session(tmp_path / who, server, StoreLock(tmp_path / who).__enter__()) for who in ("alice", "bob")]


def test_another_writers_in_place_update_moves_the_generation(tmp_path, caplog):
    alice, bob = _shared_server_sessions(tmp_path)
    name = "m3d_t_mean"
    ids, vectors, payloads = _points(0, 100)
    alice.vectors.ensure_collection(name, DIM)
    alice.upsert(name, ids, vectors, payloads)
    alice.save_exact(name)
    before = alice.exact(name).search(vectors[:1], 1)[1][0]
    assert before == ids[:1]

    _, other, _ = _points(0, 100, seed=9)
    bob.upsert(name, ids[:50], other[:50], payloads[:50])  # in place: the count stays 100
    bob.save_exact(name)
    with caplog.at_level(logging.WARNING, logger="m3d"):
        index = alice.exact(name)
    assert "another generation" in _one_warning(caplog)
    _assert_same(_rows(index), _qdrant_rows(alice, name))
    assert index.search(other[:1], 1)[1][0] == ids[:1]  # answers from bob's vectors, not the old ones


def test_a_concurrent_writer_makes_the_other_sessions_faiss_rebuild(tmp_path):
    alice, bob = _shared_server_sessions(tmp_path)
    name = "m3d_t_mean"
    ids, vectors, payloads = _points(0, 100)
    alice.vectors.ensure_collection(name, DIM)
    alice.upsert(name, ids[:50], vectors[:50], payloads[:50])
    bob.upsert(name, ids[50:], vectors[50:], payloads[50:])  # while alice's sync is still running
    alice.upsert(name, ids[:10], vectors[:10], payloads[:10])
    saved = alice.save_exact(name)  # alice's rows miss bob's writes: rebuilt, not saved as they are
    assert len(saved) == 100
    _assert_same(_rows(saved), _qdrant_rows(alice, name))


def test_a_write_that_bypasses_m3d_is_caught_by_the_row_check(session, caplog):
    name = "m3d_t_mean"
    ids, vectors, payloads = _points(0, 12)
    session.upsert(name, ids, vectors, payloads)
    session.save_exact(name)
    session._exact.clear()
    session.vectors.upsert(name, ids[3:4], -vectors[3:4], payloads[3:4])  # raw engine write: no new generation
    with caplog.at_level(logging.WARNING, logger="m3d"):
        index = session.exact(name)
    assert "other vectors" in _one_warning(caplog)
    np.testing.assert_allclose(index.vectors[index.row(ids[3])], -vectors[3], atol=1e-6)


def test_a_row_whose_id_qdrant_does_not_hold_is_caught(session, caplog):
    """Right count, right generation, right vectors, but one row under an id Qdrant has never held:
    the sampled ids are checked too (retrieve skips an unknown id without a word)."""
    name = "m3d_t_mean"
    ids, vectors, payloads = _points(0, 12)
    session.upsert(name, ids, vectors, payloads)
    session.save_exact(name)
    index = session.exact(name)
    stranger = "00000000-0000-4000-8000-00000000abcd"
    index.remove(ids[5:6])
    index.upsert([stranger], vectors[5:6])
    index.commit(session.vectors.generation(name))
    session._exact.clear()
    with caplog.at_level(logging.WARNING, logger="m3d"):
        rebuilt = session.exact(name)
    assert "other ids" in _one_warning(caplog)
    assert rebuilt.row(stranger) is None and rebuilt.row(ids[5]) is not None


def test_damaged_or_old_faiss_files_are_rebuilt_not_misread(session):
    name = "m3d_t_mean"
    ids, vectors, payloads = _points(0, 30)
    session.upsert(name, ids, vectors, payloads)
    session.save_exact(name)
    path = session.exact_dir / f"{name}.faiss"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    session._exact.clear()
    _assert_same(_rows(session.exact(name)), _qdrant_rows(session, name))
    np.savez(path, index=np.zeros(3), ids=np.array(ids))  # the previous release's layout
    session._exact.clear()
    _assert_same(_rows(session.exact(name)), _qdrant_rows(session, name))


def test_rebuild_fills_a_new_version_while_readers_keep_the_complete_old_one(session, caplog):
    name = "m3d_t_mean"
    ids, vectors, payloads = _points(0, 60)
    session.upsert(name, ids[:50], vectors[:50], payloads[:50])
    session.finish(name)
    version = session.vectors.begin_rebuild(name)
    assert version == "m3d_t_mean--v1"
    session.vectors.ensure_collection(version, DIM)
    session.upsert(version, ids[:20], vectors[:20], payloads[:20])  # half-built, then the process dies
    assert session.collections() == [name]  # readers never see the half-built version
    assert session.vectors.count(name) == 50 and len(session.exact(name)) == 50

    version = session.vectors.begin_rebuild(name)  # the next attempt drops the leftover and starts afresh
    assert version == "m3d_t_mean--v2" and session.collections() == [name]
    session.vectors.ensure_collection(version, DIM)
    session.upsert(version, ids, vectors, payloads)
    session.finish(version)
    session.publish(name, version)
    assert session.collections() == [name] and session.vectors.physical(name) == version
    assert session.vectors.count(name) == 60
    with caplog.at_level(logging.INFO, logger="m3d"):
        index = session.exact(name)  # the version's FAISS moved with it: trusted, no rebuild
    assert not [r for r in caplog.records if "rebuilt" in r.getMessage()]
    _assert_same(_rows(index), _qdrant_rows(session, name))
    assert session.vectors.search(name, vectors[55:56], 1)[0][0].id == ids[55]

    third = session.vectors.begin_rebuild(name)
    session.vectors.ensure_collection(third, DIM)
    session.upsert(third, ids[:5], vectors[:5], payloads[:5])
    session.finish(third)
    session.publish(name, third)
    assert (third, session.vectors.count(name)) == ("m3d_t_mean--v3", 5)
    assert session.vectors._physical_names() == {third}  # the replaced versions are gone
    session.drop(name)
    assert session.collections() == []
