"""Which dataset a folder is, and whether a file changed: two folders with one name, a re-pointed
symlinked root, a folder moved, and content edited behind an unchanged size and mtime."""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from m3d.cli import app
from m3d.dataset import point_id
from m3d.errors import UsageError
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
