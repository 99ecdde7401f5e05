"""Which dataset a folder is, and whether a file changed: two folders with one name, a re-pointed
symlinked root, a folder moved, and content edited behind an unchanged size and mtime."""

import os
import shutil

from typer.testing import CliRunner

from m3d.cli import app
from m3d.dataset import point_id
from m3d.pipeline import SyncOptions, sync
from m3d.store import open_session

from helpers import make_tree

HOG = SyncOptions(encoders=("hog",), pools=("mean",), workers=0)
runner = CliRunner()


def _paths(session):
    return sorted((r.payload["dataset"], r.payload["path"]) for r in session.vectors.records("m3d_hog_mean"))


def test_same_folder_name_in_two_places_is_refused_not_wiped(lpsb, tmp_path):
    first = make_tree(lpsb, tmp_path / "dsA" / "shapes", {"Chair": 2})
    second = make_tree(lpsb, tmp_path / "dsB" / "shapes", {"Cup": 2})
    store = tmp_path / "store"
    with open_session(store) as session:
        sync(session, first, HOG)
    out = runner.invoke(app, ["sync", str(second), "--encoders", "hog", "--pools", "mean", "--workers", "0",
                              "--store", str(store)])
    assert out.exit_code == 2 and out.stderr.count("\n") == 1
    assert str(first) in out.stderr and str(second) in out.stderr and "--dataset" in out.stderr
    with open_session(store) as session:
        assert _paths(session) == [("shapes", "Chair/train/101.off"), ("shapes", "Chair/train/102.off")]
        sync(session, second, HOG, dataset="shapes-b")  # the way out the message names
        assert session.vectors.count("m3d_hog_mean") == 4

    # a move: the old folder is gone, so the new place is accepted, recorded, and nothing re-embedded
    moved = tmp_path / "elsewhere" / "shapes"
    moved.parent.mkdir()
    shutil.move(first, moved)
    with open_session(store) as session:
        report = sync(session, moved, HOG)
        assert (report.unchanged, report.added, report.removed) == (2, 0, 0)
        assert session.roots()["shapes"] == str(moved)
        assert session.vectors.count("m3d_hog_mean") == 4


def test_repointed_symlink_root_is_one_dataset(lpsb, tmp_path):
    v1 = make_tree(lpsb, tmp_path / "v1", {"Chair": 2}, copy=True)
    v2 = make_tree(lpsb, tmp_path / "v2", {"Chair": 2}, copy=True)
    shutil.copyfile(lpsb / "Cup" / "21.off", v2 / "Chair" / "train" / "102.off")  # v2 changed one file
    current = tmp_path / "current"
    current.symlink_to(v1)
    with open_session(tmp_path / "store") as session:
        sync(session, current, HOG)
        current.unlink()
        current.symlink_to(v2)
        report = sync(session, current, HOG)
        assert (report.unchanged, report.updated, report.added, report.removed) == (1, 1, 0, 0)
        assert _paths(session) == [("current", "Chair/train/101.off"), ("current", "Chair/train/102.off")]
        assert session.roots() == {"current": str(current)}


def _rewrite_keeping_mtime(path, data):
    """Edit a file in place and put its mtime back, the way `cp -p`, `rsync -a` or `tar x` leave it."""
    before = path.stat()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _rotated(off_bytes: bytes) -> bytes:
    """The same OFF mesh with x and y of every vertex swapped: same size, another shape's views."""
    lines = off_bytes.decode().splitlines(keepends=True)
    n_vertices = int(lines[1].split()[0])
    out = lines[:2]
    for line in lines[2:2 + n_vertices]:
        x, y, *rest = line.split(" ")
        out.append(" ".join([y, x, *rest]))
    return "".join(out + lines[2 + n_vertices:]).encode()


def test_content_change_behind_the_same_size_and_mtime_is_seen(lpsb, tmp_path):
    tree = make_tree(lpsb, tmp_path / "meshes", {"Airplane": 2}, copy=True)
    mesh = tree / "Airplane" / "train" / "61.off"
    pid = point_id("meshes", "Airplane/train/61.off")
    with open_session(tmp_path / "store") as session:
        sync(session, tree, HOG)
        old = {r.id: r for r in session.vectors.records("m3d_hog_mean", vectors=True)}[pid]
        _rewrite_keeping_mtime(mesh, _rotated(mesh.read_bytes()))
        report = sync(session, tree, HOG)
        assert (report.updated, report.unchanged) == (1, 1)
        new = {r.id: r for r in session.vectors.records("m3d_hog_mean", vectors=True)}[pid]
        assert new.payload["content_hash"] != old.payload["content_hash"]
        assert float(new.vector @ old.vector) < 0.999  # the rotated shape's vector, not the old one

        # same bytes, new stamp (a touch): hashed once, not re-embedded, then known by its stamp again
        os.utime(mesh)
        touched = sync(session, tree, HOG)
        assert (touched.updated, touched.unchanged, touched.stages.render) == (0, 2, 0)
        stored = session.vectors.retrieve("m3d_hog_mean", [pid])[0].payload
        assert stored["mtime_ns"] == mesh.stat().st_mtime_ns and stored["ctime_ns"] == mesh.stat().st_ctime_ns


def test_verify_hashes_every_file(lpsb, tmp_path, monkeypatch):
    import m3d.pipeline.plan as plan

    tree = make_tree(lpsb, tmp_path / "meshes", {"Cup": 2}, copy=True)
    hashed = []
    monkeypatch.setattr(plan, "content_hash", lambda path: hashed.append(path.name) or _real_hash(path))
    with open_session(tmp_path / "store") as session:
        sync(session, tree, HOG)
        assert sync(session, tree, HOG).unchanged == 2 and hashed == []  # stamps match: nothing read
        verified = sync(session, tree, SyncOptions(**{**HOG.__dict__, "verify": True}))
        assert verified.unchanged == 2 and sorted(hashed) == ["21.off", "22.off"]


def _real_hash(path):
    from m3d.dataset import content_hash

    return content_hash(path)
