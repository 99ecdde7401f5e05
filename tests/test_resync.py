"""The re-sync's shortcuts and the guarantees they must keep. An unchanged re-sync plans from each
collection's sync manifest (no scan of its points and vectors, no torch, no encoder), yet a vector
damaged on disk, a file edited keeping its size and mtime, and a deleted file are all still seen."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from m3d import manifest
from m3d.dataset import point_id
from m3d.pipeline import SyncOptions, sync
from m3d.render import ViewSettings
from m3d.store import open_session

from helpers import make_tree

HOG = SyncOptions(encoders=("hog",), pools=("mean", "max"), workers=0, view=ViewSettings(up="y"))
BOTH = ["m3d_hog_max", "m3d_hog_mean"]


@pytest.fixture
def tree(lpsb, tmp_path):
    return make_tree(lpsb, tmp_path / "meshes", {"Cup": 2, "Fish": 2}, copy=True)


def _vectors(session, name):
    return {r.id: r.vector for r in session.vectors.records(name, vectors=True)}


def _zero_first_vector(store, name):
    """Zero the first row of the collection's vector file in place, its size and mtime kept (as a disk
    or a stray process would damage it); returns the id of the point whose vector that was."""
    chunk = next((store / "qdrant" / name / "shard" / "segments").glob("*/vector_storage/vectors/chunk_0.mmap"))
    with open_session(store) as session:
        dim = session.vectors.dim(name)
        first = np.fromfile(chunk, dtype=np.float32, count=dim)
        [pid] = [p for p, v in _vectors(session, name).items() if np.array_equal(v, first)]
    st = chunk.stat()
    with open(chunk, "r+b") as handle:
        handle.write(bytes(4 * dim))
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))
    return pid


def test_an_unchanged_resync_plans_from_the_manifest_and_changes_nothing(tree, tmp_path):
    store = tmp_path / "store"
    with open_session(store) as session:
        assert sync(session, tree, HOG).from_manifest == []  # nothing to vouch for yet: the points are read
        want = {name: _vectors(session, name) for name in BOTH}
    for _ in range(2):  # and again: a run that wrote nothing leaves the manifest as valid as it found it
        with open_session(store) as session:
            again = sync(session, tree, HOG)
            assert (again.from_manifest, again.unchanged, again.added, again.updated) == (BOTH, 4, 0, 0)
            for name in BOTH:
                assert _vectors(session, name).keys() == want[name].keys()


def test_a_noop_resync_imports_no_torch(tree, tmp_path):
    code = ("import sys\nfrom m3d.cli import run\nsys.argv = ['m3d', 'sync', *sys.argv[1:]]\n"
            "try:\n    run()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('torch' in sys.modules)")
    args = [str(tree), "--store", str(tmp_path / "store"), "--encoders", "hog", "--pools", "mean", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
            for _ in range(2)]
    assert [r.stdout.split()[-1] for r in runs] == ["True", "False"], [r.stderr for r in runs]


def test_a_vector_damaged_on_disk_is_caught_by_the_next_sync(tree, tmp_path):
    store = tmp_path / "store"
    with open_session(store) as session:
        sync(session, tree, HOG)
        want = _vectors(session, "m3d_hog_mean")
    damaged = _zero_first_vector(store, "m3d_hog_mean")
    with open_session(store) as session:
        again = sync(session, tree, HOG)  # the file's ctime moved: the manifest no longer vouches for it
        assert again.from_manifest == ["m3d_hog_max"] and (again.added, again.unchanged) == (1, 3)
        got = _vectors(session, "m3d_hog_mean")
        np.testing.assert_allclose(got[damaged], want[damaged], atol=1e-6)
        assert all(row["ok"] for row in session.check())


def test_damage_no_stat_can_see_is_caught_by_check_and_then_synced(tree, tmp_path):
    """Bit rot moves no mtime or ctime: emulated by a manifest re-signed to the damaged files. `m3d
    check` reads every vector, names the damage and drops the manifest, so the next sync repairs it."""
    store = tmp_path / "store"
    with open_session(store) as session:
        sync(session, tree, HOG)
        want = _vectors(session, "m3d_hog_mean")
    damaged = _zero_first_vector(store, "m3d_hog_mean")
    with open_session(store) as session:
        saved = json.loads(manifest.path(session, "m3d_hog_mean").read_text())
        manifest.path(session, "m3d_hog_mean").write_text(json.dumps({**saved, **manifest.state(session, "m3d_hog_mean")}))
        rows = {row["collection"]: row for row in session.check()}
        assert (rows["m3d_hog_mean"]["damaged_vectors"], rows["m3d_hog_mean"]["ok"]) == (1, False)
        assert not manifest.path(session, "m3d_hog_mean").exists() and manifest.path(session, "m3d_hog_max").exists()
        again = sync(session, tree, HOG)
        assert again.from_manifest == ["m3d_hog_max"] and again.added == 1
        np.testing.assert_allclose(_vectors(session, "m3d_hog_mean")[damaged], want[damaged], atol=1e-6)


def test_an_edit_that_keeps_size_and_mtime_is_embedded_again(tree, tmp_path):
    store = tmp_path / "store"
    victim = tree / "Cup" / "train" / "21.off"
    pid = point_id("meshes", "Cup/train/21.off")
    with open_session(store) as session:
        sync(session, tree, HOG)
        before = _vectors(session, "m3d_hog_mean")[pid]
    st = victim.stat()
    lines = victim.read_text().splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]  # two vertices swapped: same bytes count, another mesh
    victim.write_text("".join(lines))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with open_session(store) as session:
        again = sync(session, tree, HOG)  # the store is as the manifest says: the file's ctime moved
        assert again.from_manifest == BOTH and (again.updated, again.unchanged) == (1, 3)
        assert not np.allclose(_vectors(session, "m3d_hog_mean")[pid], before, atol=1e-4)
    with open_session(store) as session:  # the manifest written after the edit vouches for the store
        after = sync(session, tree, HOG)
        assert (after.from_manifest, after.updated, after.unchanged) == (BOTH, 0, 4)


def test_a_deleted_file_leaves_every_collection_and_faiss(tree, tmp_path):
    store = tmp_path / "store"
    pid = point_id("meshes", "Fish/train/221.off")
    with open_session(store) as session:
        sync(session, tree, HOG)
    (tree / "Fish" / "train" / "221.off").unlink()
    with open_session(store) as session:
        again = sync(session, tree, HOG)
        assert again.from_manifest == BOTH and again.removed == 1
    with open_session(store) as session:
        for name in BOTH:
            assert pid not in _vectors(session, name) and pid not in session.exact(name).ids
            assert session.vectors.count(name) == 3
        after = sync(session, tree, HOG)
        assert (after.from_manifest, after.removed, after.unchanged) == (BOTH, 0, 3)
