"""Zero-downtime rebuild (issue 10 item 5): `m3d sync --rebuild` with other settings fills a new version
of each collection while readers keep the complete old one, and moves them over only when it is done.
kill -9 a real rebuild half-way: the store still reads the old collection, whole and in step; the next
rebuild completes. Real meshes, real qdrant-edge, two real processes."""

import os
import signal
import subprocess
import sys

import numpy as np

from m3d.connector import IndexSettings
from m3d.pipeline import SyncOptions, sync
from m3d.store import open_session

from helpers import make_tree

HOG = dict(encoders=("hog",), pools=("mean",), workers=0, batch_size=8)


def _state(store_dir):
    with open_session(store_dir) as session:
        name = "m3d_hog_mean"
        return {"collections": session.collections(), "count": session.vectors.count(name),
                "physical": session.vectors.physical(name), "m": session.vectors.index_info(name).settings.hnsw_m,
                "faiss": sorted(session.exact(name).ids), "ok": all(r["ok"] for r in session.check()),
                "vectors": {r.id: r.vector for r in session.vectors.records(name, vectors=True)}}


def test_killed_rebuild_leaves_readers_on_the_complete_old_collection(lpsb, tmp_path):
    tree = make_tree(lpsb, tmp_path / "meshes", {"Airplane": 4, "Chair": 4, "Cup": 4})
    store_dir = tmp_path / "store"
    with open_session(store_dir) as session:
        sync(session, tree, SyncOptions(**HOG))
    before = _state(store_dir)
    assert before["count"] == 12 and before["physical"] == "m3d_hog_mean" and before["m"] == 16

    cmd = [sys.executable, "-m", "m3d.cli", "-v", "sync", str(tree), "--store", str(store_dir), "--encoders", "hog",
           "--pools", "mean", "--workers", "0", "--batch-size", "8", "--rebuild", "--hnsw-m", "8"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "upserted" in line:  # the new version holds some points, not all
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert any("rebuilding m3d_hog_mean as m3d_hog_mean--v1" in line for line in seen), "".join(seen[-5:])

    during = _state(store_dir)  # a reader after the kill: the old collection, complete and in step
    assert during["collections"] == ["m3d_hog_mean"] and during["physical"] == "m3d_hog_mean"
    assert (during["count"], during["m"], during["faiss"], during["ok"]) == (12, 16, before["faiss"], True)
    assert (store_dir / "qdrant" / "m3d_hog_mean--v1").is_dir()  # the half-built version, hidden

    with open_session(store_dir) as session:  # the next rebuild starts afresh and completes
        report = sync(session, tree, SyncOptions(**HOG, rebuild=True, index=IndexSettings(hnsw_m=8)))
    assert report.added == 12
    after = _state(store_dir)
    assert after["collections"] == ["m3d_hog_mean"] and after["physical"] == "m3d_hog_mean--v2"
    assert (after["count"], after["m"], after["faiss"], after["ok"]) == (12, 8, before["faiss"], True)
    assert sorted(p.name for p in (store_dir / "qdrant").iterdir() if p.is_dir()) == ["m3d_hog_mean--v2"]
    for pid, vector in before["vectors"].items():  # same meshes, same settings that decide the vector
        np.testing.assert_allclose(after["vectors"][pid], vector, atol=1e-6)
    with open_session(store_dir) as session:  # a later plain sync works on the new version in place
        assert sync(session, tree, SyncOptions(**HOG)).unchanged == 12
