"""The whole path on real meshes and real stores: sync, incremental re-sync, fingerprints, bad files,
query (Qdrant and FAISS), eval, and the server code path through qdrant-client's in-process mode."""

import json
import re
import shutil

import numpy as np
import pytest

from m3d.dataset import point_id
from m3d.errors import StoreError
from m3d.evaluate import evaluate
from m3d.pipeline import EXIT_SKIPPED, SyncOptions, sync
from m3d.render import ViewSettings
from m3d.search import query
from m3d.store import open_session

from helpers import make_tree

CLASSES = {"Airplane": 3, "Chair": 3, "Cup": 3}
HOG = SyncOptions(encoders=("hog",), workers=0, view=ViewSettings(up="y"))  # orientation: test_orientation.py


@pytest.fixture
def tree(lpsb, tmp_path):
    return make_tree(lpsb, tmp_path / "meshes", CLASSES, copy=True)


def _state(session):
    """Per collection: {point id: (path, content hash)} and the FAISS ids."""
    out = {}
    for name in session.collections():
        points = {r.id: (r.payload["path"], r.payload["content_hash"]) for r in session.vectors.records(name)}
        out[name] = (points, sorted(session.exact(name).ids))
    return out


def test_sync_query_eval_and_incremental(tree, tmp_path):
    with open_session(tmp_path / "store") as session:
        report = sync(session, tree, HOG)
        assert (report.added, report.unchanged, report.skipped) == (9, 0, [])
        assert report.collections == ["m3d_hog_attn", "m3d_hog_max", "m3d_hog_mean"]
        for name in report.collections:
            assert session.vectors.count(name) == 9
            assert sorted(session.exact(name).ids) == sorted(r.id for r in session.vectors.records(name))
            assert session.vectors.facet(name, "class") == {"Airplane": 3, "Chair": 3, "Cup": 3}
        payload = next(iter(session.vectors.retrieve("m3d_hog_mean", [point_id("meshes", "Chair/train/101.off")]))).payload
        assert payload["class"] == "Chair" and payload["split"] == "train" and payload["path"] == "Chair/train/101.off"
        assert payload["pipeline"] == {"encoder": "hog", "model_id": payload["pipeline"]["model_id"], "pool": "mean",
                                       "precision": "fp32", "views": 8, "elevation": 20.0, "resolution": 224, "renderer": "moderngl",
                                       "up": "y", "layout": "ring", "align": "none"}
        assert payload["pose"] == {"up": "y", "source": "given", "rotation": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}
        assert payload["faces"] > 1000 and len(payload["content_hash"]) == 32

        # a stored mesh finds itself first, from Qdrant and from FAISS, and the class filter holds
        mesh = tree / "Chair" / "train" / "101.off"
        for exact in (False, True):
            result = query(session, mesh, collection="m3d_hog_mean", k=3, exact=exact)
            assert result.hits[0].id == point_id("meshes", "Chair/train/101.off")
            assert result.hits[0].score == pytest.approx(1.0, abs=1e-3)
            filtered = query(session, mesh, collection="m3d_hog_max", k=3, label="Cup", exact=exact)
            assert [h.payload["class"] for h in filtered.hits] == ["Cup"] * 3
        results = {r.collection: r for r in evaluate(session)}
        assert set(results) == set(report.collections)
        assert all(r.recall == 1.0 and r.objects == 9 for r in results.values())
        before = _state(session)

        # unchanged: nothing is rendered again
        again = sync(session, tree, HOG)
        assert (again.added, again.updated, again.unchanged, again.removed) == (0, 0, 9, 0)
        assert again.stages.render == 0 and again.stages.encode == 0
        assert _state(session) == before

        # change one file (same path, other content), delete one, add one
        changed = tree / "Cup" / "train" / "21.off"
        shutil.copyfile(tree / "Airplane" / "train" / "61.off", changed)
        (tree / "Chair" / "train" / "102.off").unlink()
        shutil.copyfile(tree / "Chair" / "train" / "101.off", tree / "Chair" / "train" / "999.off")
        third = sync(session, tree, HOG)
        assert (third.added, third.updated, third.unchanged, third.removed) == (1, 1, 7, 1)
        after = _state(session)
        for name in report.collections:
            points, faiss_ids = after[name]
            assert len(points) == 9 and sorted(points) == faiss_ids
            assert point_id("meshes", "Chair/train/102.off") not in points
            assert points[point_id("meshes", "Cup/train/21.off")][1] != before[name][0][point_id("meshes", "Cup/train/21.off")][1]
        moved = query(session, changed, collection="m3d_hog_mean", k=2, exact=True)
        assert {h.payload["path"] for h in moved.hits} == {"Cup/train/21.off", "Airplane/train/61.off"}


def test_other_settings_are_refused_unless_rebuild(tree, tmp_path):
    with open_session(tmp_path / "store") as session:
        sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean",), workers=0))
        four_views = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=ViewSettings(views=4))
        with pytest.raises(StoreError, match=r"views: 8 -> 4.*--rebuild"):
            sync(session, tree, four_views)
        assert session.vectors.count("m3d_hog_mean") == 9  # nothing lost by the refusal
        rebuilt = sync(session, tree, SyncOptions(**{**four_views.__dict__, "rebuild": True}))
        assert rebuilt.added == 9
        assert session.fingerprint("m3d_hog_mean").view.views == 4


def test_bad_files_are_recorded_and_the_rest_is_stored(tree, tmp_path):
    (tree / "Cup" / "train" / "bad.off").write_text("OFF\n3 1 0\n0 0 0\n1 1\n")
    (tree / "Cup" / "train" / "empty.off").write_bytes(b"")
    (tree / "Cup" / "train" / "dangling.off").symlink_to(tmp_path / "nowhere.off")
    (tree / "Cup" / "train" / "loop_a.off").symlink_to(tree / "Cup" / "train" / "loop_b.off")
    (tree / "Cup" / "train" / "loop_b.off").symlink_to(tree / "Cup" / "train" / "loop_a.off")
    (tree / "Cup" / "train" / "notes.txt").write_text("not a mesh")
    with open_session(tmp_path / "store") as session:
        report = sync(session, tree, HOG)
        assert report.exit_status == EXIT_SKIPPED
        reasons = {s["rel_path"]: s["reason"] for s in report.skipped}
        assert set(reasons) == {"Cup/train/bad.off", "Cup/train/empty.off", "Cup/train/dangling.off",
                                "Cup/train/loop_a.off", "Cup/train/loop_b.off"}
        assert "empty" in reasons["Cup/train/empty.off"]
        assert "symbolic links" in reasons["Cup/train/loop_a.off"] or "loop" in reasons["Cup/train/loop_a.off"]
        assert all("\n" not in r for r in reasons.values())
        assert session.vectors.count("m3d_hog_mean") == 9

        # a stored file that turns bad is skipped and its stale vector removed, not left answering
        (tree / "Chair" / "train" / "101.off").write_text("OFF\n1 0 0\n")
        second = sync(session, tree, HOG)
        assert {s["rel_path"] for s in second.skipped} >= {"Chair/train/101.off"}
        assert session.vectors.count("m3d_hog_mean") == 8
        assert len(session.exact("m3d_hog_mean").ids) == 8


def test_server_code_path_gives_the_same_vectors(tree, tmp_path):
    options = SyncOptions(encoders=("hog",), pools=("attn",), workers=0)
    with open_session(tmp_path / "embedded") as session:
        sync(session, tree, options)
        embedded = {r.id: r.vector for r in session.vectors.records("m3d_hog_attn", vectors=True)}
    with open_session(tmp_path / "server", url=":memory:") as session:
        assert session.vectors.location == "Qdrant server at :memory:"
        sync(session, tree, options)
        served = {r.id: r.vector for r in session.vectors.records("m3d_hog_attn", vectors=True)}
        assert session.vectors.facet("m3d_hog_attn", "class") == {"Airplane": 3, "Chair": 3, "Cup": 3}
    assert embedded.keys() == served.keys()
    for pid in embedded:
        np.testing.assert_allclose(embedded[pid], served[pid], atol=1e-5)


def test_render_workers_give_the_same_vectors_as_in_process(tree, tmp_path):
    vectors = {}
    for workers in (0, 2):
        with open_session(tmp_path / f"w{workers}") as session:
            sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean",), workers=workers))
            vectors[workers] = {r.id: r.vector for r in session.vectors.records("m3d_hog_mean", vectors=True)}
    assert vectors[0].keys() == vectors[2].keys()
    for pid in vectors[0]:
        np.testing.assert_allclose(vectors[0][pid], vectors[2][pid], atol=1e-6)


def test_damaged_vector_is_reported_and_reembedded(tree, tmp_path):
    options = SyncOptions(encoders=("hog",), pools=("mean",), workers=0)
    with open_session(tmp_path / "store") as session:
        sync(session, tree, options)
        pid = point_id("meshes", "Cup/train/22.off")
        record = session.vectors.retrieve("m3d_hog_mean", [pid])[0]
        good = {r.id: r.vector for r in session.vectors.records("m3d_hog_mean", vectors=True)}[pid]
        session.vectors.upsert("m3d_hog_mean", [pid], np.zeros((1, len(good)), np.float32), [record.payload])
        [row] = session.check()
        assert (row["damaged_vectors"], row["ok"]) == (1, False)
        again = sync(session, tree, options)
        assert (again.added, again.unchanged) == (1, 8)
        [row] = session.check()
        assert (row["damaged_vectors"], row["ok"]) == (0, True)
        fixed = {r.id: r.vector for r in session.vectors.records("m3d_hog_mean", vectors=True)}[pid]
        np.testing.assert_allclose(fixed, good, atol=1e-6)


def test_neural_encoders_from_checkpoint_directories(tree, tmp_path, ckpts):
    """Tiny random CLIP and DINOv2 checkpoints through the whole path: one collection per
    (encoder, pool), named after the checkpoint directory, with the model's own dimension."""
    options = SyncOptions(encoders=(str(ckpts["clip"]), str(ckpts["dinov2"])), pools=("mean", "attn"), workers=0,
                          precision="fp32")
    with open_session(tmp_path / "store") as session:
        report = sync(session, tree, options)
        assert report.collections == ["m3d_tiny_clip_attn", "m3d_tiny_clip_mean", "m3d_tiny_dinov2_attn",
                                      "m3d_tiny_dinov2_mean"]
        assert re.fullmatch(r"local:tiny_clip@sha256:[0-9a-f]{16}", session.fingerprint("m3d_tiny_clip_mean").model_id)
        dims = {name: session.vectors.dim(name) for name in report.collections}
        assert len(set(dims.values())) == 2  # CLIP projection dim vs DINOv2 hidden size
        for name in report.collections:
            assert session.vectors.count(name) == 9
        result = query(session, tree / "Airplane" / "train" / "62.off", collection="m3d_tiny_dinov2_attn", k=1)
        assert result.hits[0].payload["path"] == "Airplane/train/62.off"
        assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert sync(session, tree, options).unchanged == 9


def test_local_checkpoint_paths_never_reach_the_payload(tree, tmp_path, ckpts):
    """A checkpoint directory is stored as its name and a weights digest: no point, fingerprint or
    collection name holds the local path; this store remembers the path locally so query still works,
    and elsewhere (or after a move) --checkpoint DIR with the same weights does."""
    from m3d.errors import ModelLoadError

    private = tmp_path / "home" / "alice" / "private_clip"
    shutil.copytree(ckpts["clip"], private)
    options = SyncOptions(encoders=(str(private),), pools=("mean",), workers=0, precision="fp32")
    with open_session(tmp_path / "store") as session:
        assert sync(session, tree, options).collections == ["m3d_private_clip_mean"]
        records = list(session.vectors.records("m3d_private_clip_mean", vectors=False))
        assert len(records) == 9
        assert not any("alice" in json.dumps(r.payload) for r in records)
        fp = session.fingerprint("m3d_private_clip_mean")
        assert fp.encoder == fp.model_id and fp.model_id.startswith("local:private_clip@sha256:")
        assert session.checkpoints() == {fp.model_id: str(private)}  # local metadata, beside roots.json
        mesh = tree / "Chair" / "train" / "101.off"
        assert query(session, mesh, k=1).hits[0].payload["path"] == "Chair/train/101.off"
    (tmp_path / "store" / "reports" / "checkpoints.json").unlink()  # a teammate's machine: path unknown
    moved = shutil.copytree(private, tmp_path / "elsewhere" / "clip-copy")
    with open_session(tmp_path / "store") as session:
        with pytest.raises(ModelLoadError, match=r"local checkpoint .*pass --checkpoint DIR"):
            query(session, mesh, k=1)
        assert query(session, mesh, k=1, checkpoint=moved).hits[0].payload["path"] == "Chair/train/101.off"
        with pytest.raises(ModelLoadError, match="other weights"):
            query(session, mesh, k=1, checkpoint=ckpts["dinov2"])


def test_uncached_hub_model_fails_at_once_and_stores_nothing(tree, tmp_path, monkeypatch):
    from m3d.errors import ModelLoadError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with open_session(tmp_path / "store") as session:
        with pytest.raises(ModelLoadError, match=r"not available offline.*hog"):
            sync(session, tree, SyncOptions(workers=0))  # defaults: clip + dinov2 from the hub
        assert session.collections() == []


def test_crash_before_faiss_rebuild_never_serves_old_vectors(tree, tmp_path, monkeypatch):
    from m3d.store import Session

    with open_session(tmp_path / "store") as session:
        sync(session, tree, HOG)
    changed = tree / "Cup" / "train" / "21.off"
    shutil.copyfile(tree / "Chair" / "train" / "103.off", changed)
    monkeypatch.setattr(Session, "save_exact", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with open_session(tmp_path / "store") as session:
        with pytest.raises(KeyboardInterrupt):  # Qdrant is written, FAISS is not: the crash window
            sync(session, tree, HOG)
    monkeypatch.undo()
    with open_session(tmp_path / "store") as session:
        assert not any(row["in_step"] for row in session.check())  # stale, not silently "ok"
        hits = query(session, changed, collection="m3d_hog_mean", k=2, exact=True).hits  # 21 is now a copy of 103
        assert {h.payload["path"] for h in hits} == {"Cup/train/21.off", "Chair/train/103.off"}
        assert [h.score for h in hits] == pytest.approx([1.0, 1.0], abs=1e-4)
        rows = {row["collection"]: row for row in session.check()}
        assert rows["m3d_hog_mean"]["ok"] and not rows["m3d_hog_max"]["in_step"]  # exact() rebuilt mean only
        assert all(row["ok"] for row in session.check(repair=True))


def test_unchanged_files_keep_their_vectors_when_a_rerun_skips_them(tree, tmp_path):
    with open_session(tmp_path / "store") as session:
        sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean",), workers=0))
        adding_a_pool = SyncOptions(encoders=("hog",), pools=("mean", "max"), workers=0, max_faces=1000)
        report = sync(session, tree, adding_a_pool)
        assert len(report.skipped) == 9 and report.added == 0
        assert session.vectors.count("m3d_hog_mean") == 9  # skipped for a new limit, still valid


def test_a_point_from_other_settings_is_embedded_again(tree, tmp_path):
    with open_session(tmp_path / "store") as session:
        sync(session, tree, HOG)
        pid = point_id("meshes", "Cup/train/23.off")
        record = session.vectors.retrieve("m3d_hog_mean", [pid])[0]
        foreign = {**record.payload, "pipeline": {**record.payload["pipeline"], "views": 4}}
        vector = {r.id: r.vector for r in session.vectors.records("m3d_hog_mean", vectors=True)}[pid]
        session.vectors.upsert("m3d_hog_mean", [pid], vector[None], [foreign])  # e.g. another writer on a server
        again = sync(session, tree, HOG)
        assert (again.added, again.unchanged) == (1, 8)
        assert all(row["fingerprints"] == 1 and row["ok"] for row in session.check())


def test_two_datasets_with_the_same_relative_paths_coexist(lpsb, tmp_path):
    first = make_tree(lpsb, tmp_path / "ModelNet10", {"Chair": 2})
    second = make_tree(lpsb, tmp_path / "ModelNet40", {"Chair": 2}, copy=True)  # written to below
    shutil.copyfile(lpsb / "Cup" / "21.off", second / "Chair" / "train" / "101.off")  # same path, other mesh
    with open_session(tmp_path / "store") as session:
        sync(session, first, HOG)
        sync(session, second, HOG)
        assert session.vectors.count("m3d_hog_mean") == 4
        assert sync(session, first, HOG).unchanged == 2  # neither overwrote the other
        assert session.vectors.facet("m3d_hog_mean", "dataset") == {"ModelNet10": 2, "ModelNet40": 2}
