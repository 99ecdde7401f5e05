"""The store damage corpus: each case damages a copy of a real store the way a disk, a crash or a
careless hand does. Every command then answers or fails in one line (never a traceback),
`m3d check` names the damage, `m3d check --repair` fixes what can be rebuilt, and the next `m3d sync`
converges to the undamaged store."""

import json
import os
import shutil
import subprocess
import sys

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


def _faiss(store):
    return store / "faiss" / f"{COLLECTION}.faiss"


def _garble(path, offset, size, seed=0):
    """Overwrite size bytes at offset with random ones (a bad sector, a stray write)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())


def _garble_faiss_rows(store):
    """Random bytes over the first rows of the FAISS file, its header intact."""
    raw = _faiss(store).read_bytes()
    header = json.loads(raw[8:4096].decode())
    _garble(_faiss(store), 4096 + header["capacity"] * 36, 4 * header["dim"])


def _garble_id_tracker(store):
    """The internal ids of the id tracker's entries (the 4 bytes after each type byte and UUID) turned
    into huge numbers: the engine would size a table by them and abort the process."""
    path = _segment(store) / "mutable_id_tracker.mappings"
    data = bytearray(path.read_bytes())
    for at in range(17, len(data), 21):
        data[at:at + 4] = (0x7FFFFFF0 + at).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _garble_payload_tracker(store):
    """The payload tracker (where each point's payload lives), and its journal where one is left."""
    for path in (_segment(store) / "payload_storage").glob("tracker*.dat"):
        _garble(path, 0, min(256, path.stat().st_size))


DAMAGE = {
    "truncated FAISS file": lambda s: _faiss(s).write_bytes(_faiss(s).read_bytes()[:1000]),
    "emptied FAISS file": lambda s: _truncate(_faiss(s), 0),
    "half-cut FAISS file": lambda s: _truncate(_faiss(s), _faiss(s).stat().st_size // 2),
    "garbled FAISS header": lambda s: _garble(_faiss(s), 0, 64),
    "garbled FAISS rows": _garble_faiss_rows,
    "FAISS file is a directory": lambda s: _replace_with_dir(_faiss(s)),
    "m3d.json deleted": lambda s: (s / "qdrant" / COLLECTION / "m3d.json").unlink(),
    "emptied vector status": lambda s: _truncate(_segment(s) / "vector_storage" / "vectors" / "status.dat", 0),
    "half-cut vector status": lambda s: _truncate(_segment(s) / "vector_storage" / "vectors" / "status.dat", 4),
    "garbled payload tracker": _garble_payload_tracker,
    "garbled id tracker": _garble_id_tracker,
    "garbled vector chunk": lambda s: _garble(_segment(s) / "vector_storage" / "vectors" / "chunk_0.mmap", 0, 4096),
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


#: What `m3d check` must say for each case (a reason a user can act on, with its fix).
NAMED = {
    "truncated FAISS file": "is cut short", "emptied FAISS file": "is empty", "half-cut FAISS file": "is cut short",
    "garbled FAISS header": "garbled header", "garbled FAISS rows": "holds other vectors than Qdrant",
    "FAISS file is a directory": "should be a FAISS file, not a directory",
    "m3d.json deleted": "has lost its m3d.json", "emptied vector status": "status.dat 0 of its 8 bytes",
    "half-cut vector status": "status.dat 4 of its 8 bytes", "garbled payload tracker": "is damaged",
    "garbled id tracker": "mutable_id_tracker.mappings names internal id",
}
#: Damage the engine itself cannot survive reading (a panic, or an abort of the whole process).
ENGINE_DAMAGE = ["emptied vector status", "half-cut vector status", "garbled payload tracker", "garbled id tracker"]


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
    problems = " ".join(row["problems"] for row in json.loads(found.stdout))
    assert NAMED.get(case, "") in problems and "m3d check --repair" in problems, problems
    assert "Warning" not in found.output, found.output  # a garbled float is damage counted, not a numpy warning
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


def _m3d(*args):
    return subprocess.run([sys.executable, "-m", "m3d.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "RUST_BACKTRACE": "1"})


@pytest.mark.parametrize("case", ENGINE_DAMAGE)
def test_engine_damage_is_one_line_in_a_real_process(pristine, tmp_path, case):
    """Damage that makes the engine panic (a BaseException the CLI's handler crashed on) or abort the
    process (exit 134): every command, run as the user runs it, ends in one line naming the collection
    and the damage, with no traceback and no Rust backtrace; repair sets it aside and sync rebuilds it."""
    tree, clean, want = pristine
    store = str(_damaged(clean, tmp_path / "store", case))
    for args in (["check"], ["info"], ["sync", str(tree), *SYNC]):
        result = _m3d(*args, "--store", store)
        assert result.returncode == 1, (args, result.returncode, result.stderr[-2000:])
        assert result.stderr.startswith("error: ") or args == ["check"], result.stderr[-2000:]
        assert result.stderr.count("\n") <= 1 and COLLECTION in result.stdout + result.stderr, result.stderr[-2000:]
    repaired = _m3d("check", "--repair", "--store", store)
    assert "set aside" in repaired.stdout and repaired.stderr == "", repaired.stdout + repaired.stderr
    assert _m3d("sync", str(tree), *SYNC, "--store", store).returncode == 0
    assert _m3d("check", "--store", store).returncode == 0
    assert _vectors(tmp_path / "store").keys() == want.keys()
