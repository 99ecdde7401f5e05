"""The store damage corpus: each case damages a copy of a real store the way a disk, a crash or a
careless hand does. Every command then answers or fails in one line (never a traceback),
`m3d check` names the damage, `m3d check --repair` fixes what can be rebuilt, and the next `m3d sync`
converges to the undamaged store."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from m3d.cli import app
from m3d.store import open_session

from helpers import make_tree

runner = CliRunner()
SYNC = ["--encoders", "hog", "--pools", "mean", "--workers", "0"]
COLLECTION = "m3d_hog_mean"


def _segment(store):
    return next((store / "qdrant" / COLLECTION / "shard" / "segments").iterdir())


def _replace_with_file(path):
    shutil.rmtree(path)
    path.write_text("not a folder")


def _replace_with_dir(path):
    path.unlink()
    path.mkdir()


DAMAGE = {
    "truncated FAISS file": lambda s: (s / "faiss" / f"{COLLECTION}.faiss").write_bytes(
        (s / "faiss" / f"{COLLECTION}.faiss").read_bytes()[:1000]),
    "garbled m3d.json": lambda s: (s / "qdrant" / COLLECTION / "m3d.json").write_text("{garb"),
    "wrong dim in m3d.json": lambda s: (s / "qdrant" / COLLECTION / "m3d.json").write_text('{"dim": 16}'),
    "truncated vector chunk": lambda s: _truncate(_segment(s) / "vector_storage" / "vectors" / "chunk_0.mmap", 5000),
    "truncated payload page": lambda s: _truncate(_segment(s) / "payload_storage" / "page_0.dat", 100),
    "faiss/ is a file": lambda s: _replace_with_file(s / "faiss"),
    "reports/ is a file": lambda s: _replace_with_file(s / "reports"),
    "last-sync.json is a directory": lambda s: _replace_with_dir(s / "reports" / "last-sync.json"),
    "roots.json holds a list": lambda s: (s / "reports" / "roots.json").write_text("[1, 2]"),
    "segments/ deleted": lambda s: shutil.rmtree(s / "qdrant" / COLLECTION / "shard" / "segments"),
}


def _truncate(path, size):
    with open(path, "r+b") as handle:
        handle.truncate(size)


def _vectors(store):
    with open_session(store) as session:
        return {r.id: r.vector for r in session.vectors.records(COLLECTION, vectors=True)}


@pytest.fixture(scope="module")
def pristine(lpsb, tmp_path_factory):
    base = tmp_path_factory.mktemp("damage")
    tree = make_tree(lpsb, base / "meshes", {"Cup": 2, "Fish": 2})
    store = base / "store"
    assert runner.invoke(app, ["sync", str(tree), *SYNC, "--store", str(store)]).exit_code == 0
    return tree, store, _vectors(store)


def _damaged(clean, where, case):
    subprocess.run(["cp", "-a", "--sparse=always", str(clean), str(where)], check=True)  # 32 MB mostly-hole files
    DAMAGE[case](where)
    return where


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_named_repaired_and_synced_back(pristine, tmp_path, case):
    tree, clean, want = pristine
    mesh = str(tree / "Cup" / "train" / "21.off")
    readers = _damaged(clean, tmp_path / "read", case)  # read commands: an answer or one line (some heal FAISS)
    for args in (["info"], ["query", mesh, "--k", "2"], ["query", mesh, "--exact"], ["eval", "--out", str(tmp_path / "e")],
                 ["sync", str(tree), *SYNC]):
        result = runner.invoke(app, [*args, "--store", str(readers)])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if result.exit_code not in (0, 4):
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr

    store = _damaged(clean, tmp_path / "store", case)
    found = runner.invoke(app, ["check", "--store", str(store), "--json"])
    assert found.exit_code == 1 and any(row["problems"] or not row["ok"] for row in json.loads(found.stdout))
    repaired = runner.invoke(app, ["check", "--repair", "--store", str(store), "--json"])
    assert repaired.exit_code in (0, 1) and any(row["repaired"] for row in json.loads(repaired.stdout)), repaired.output
    synced = runner.invoke(app, ["sync", str(tree), *SYNC, "--store", str(store)])
    assert synced.exit_code == 0, synced.output
    final = runner.invoke(app, ["check", "--store", str(store), "--json"])
    assert final.exit_code == 0 and all(row["ok"] for row in json.loads(final.stdout)), final.output
    assert runner.invoke(app, ["info", "--store", str(store)]).exit_code == 0
    got = _vectors(store)
    assert got.keys() == want.keys()
    for pid, vector in want.items():
        np.testing.assert_allclose(got[pid], vector, atol=1e-6)
