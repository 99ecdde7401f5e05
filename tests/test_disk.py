"""A store on a disk that fills up, and a store on a read-only mount: real tmpfs mounts (skipped, with
the reason, where this machine does not allow mounting), real `m3d` processes for every write."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from m3d.cli import app

from helpers import make_tree

runner = CliRunner()
SYNC = ["--encoders", "hog", "--pools", "mean", "--workers", "0"]


@pytest.fixture
def mount(tmp_path):
    """A fresh 200 MB tmpfs (a one-collection store takes ~55 MB of it: tmpfs counts every touched mmap page); yields (path, remount) where remount(options) changes its options."""
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")

    def remount(options):
        subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)

    yield where, remount
    subprocess.run(["umount", "-l", str(where)], check=False)


def _m3d(*args):
    """A real m3d process: a SIGBUS or a traceback shows here instead of killing the test run."""
    return subprocess.run([sys.executable, "-m", "m3d.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _exit_codes(*commands):
    """Exit statuses of several m3d commands run in one process of their own (a SIGBUS there must not
    take pytest with it): one interpreter start instead of one per command."""
    script = ("import json, sys; from typer.testing import CliRunner; from m3d.cli import app; "
              "print(json.dumps([CliRunner().invoke(app, a).exit_code for a in json.loads(sys.argv[1])]))")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    return json.loads(done.stdout.splitlines()[-1])


def _fill(where):
    """Write until the disk refuses: nothing left at all."""
    with open(where / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    return where / "filler"


def _points(store):
    info = runner.invoke(app, ["info", "--store", str(store), "--json"])
    assert info.exit_code == 0, info.output
    return {c["collection"]: c["points"] for c in json.loads(info.stdout)["collections"]}


def test_full_disk_is_one_line_reads_keep_working_and_sync_finishes_later(lpsb, tmp_path, mount):
    where, _ = mount
    tree = make_tree(lpsb, tmp_path / "meshes", {"Cup": 2}, copy=True)
    store = where / "store"
    first = _m3d("sync", str(tree), *SYNC, "--store", str(store))
    assert first.returncode == 0, first.stderr
    filler = _fill(where)
    shutil.copyfile(lpsb / "Cup" / "23.off", tree / "Cup" / "train" / "23.off")

    full = _m3d("sync", str(tree), *SYNC, "--store", str(store))
    assert full.returncode == 1, (full.returncode, full.stderr)  # not -7 (SIGBUS)
    assert full.stderr.count("\n") == 1 and "no space left (0 MB free" in full.stderr, full.stderr
    mesh = str(tree / "Cup" / "train" / "21.off")
    reads = [["info"], ["check"], ["query", mesh, "--json"], ["query", mesh, "--exact", "--json"]]
    assert _exit_codes(*[[*args, "--store", str(store)] for args in reads]) == [0, 0, 0, 0]
    assert _points(store) == {"m3d_hog_mean": 2}  # nothing stored is lost

    filler.unlink()
    again = _m3d("sync", str(tree), *SYNC, "--store", str(store), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["added"] == 1 and _points(store) == {"m3d_hog_mean": 3}
    assert runner.invoke(app, ["check", "--store", str(store)]).exit_code == 0


def test_read_only_store_answers_read_commands(lpsb, tmp_path, mount):
    where, remount = mount
    tree = make_tree(lpsb, tmp_path / "meshes", {"Cup": 2, "Fish": 2})
    store = where / "store"
    assert runner.invoke(app, ["sync", str(tree), *SYNC, "--store", str(store)]).exit_code == 0
    mesh = str(tree / "Fish" / "train" / "221.off")
    before = json.loads(runner.invoke(app, ["query", mesh, "--json", "--store", str(store)]).stdout)
    (store / "lock").unlink()  # a published store: copied without its lock file
    remount("ro")
    assert _points(store) == {"m3d_hog_mean": 4}
    for args in (["query", mesh, "--json"], ["query", mesh, "--exact", "--json"]):
        result = runner.invoke(app, [*args, "--store", str(store)])
        assert result.exit_code == 0, result.output
        assert [h["path"] for h in json.loads(result.stdout)["hits"]] == [h["path"] for h in before["hits"]]
    assert runner.invoke(app, ["check", "--store", str(store)]).exit_code == 0
    evaluated = runner.invoke(app, ["eval", "--store", str(store), "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    nowhere = runner.invoke(app, ["eval", "--store", str(store)])  # STORE/eval cannot be written: said first
    assert nowhere.exit_code == 2 and "pass --out DIR" in nowhere.stderr and nowhere.stderr.count("\n") == 1
    refused = runner.invoke(app, ["sync", str(tree), *SYNC, "--store", str(store)])
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1 and "cannot be written" in refused.stderr
    assert not (store / "lock").exists()


def test_a_write_failing_in_the_last_flush_stops_the_sync_instead_of_hanging(tmp_path):
    """A full disk found by the writer's final flush (after the producer said it was done) must reach
    the caller as an error: the writer used to wait for a second end-of-input that never came."""
    import numpy as np

    from m3d.errors import StoreError
    from m3d.pipeline.stages import Points, StageStats, Writer
    from m3d.store import open_session

    with open_session(tmp_path / "store") as session:
        writer = Writer(session, StageStats())
        vector = np.ones((1, 4), np.float32) / 2
        writer.inbox.put(Points("m3d_missing_mean", ["6f1d8a52-3c1e-5b7a-9a7e-2f4c0d9e8b11"], vector, [{}]))
        writer.inbox.put(None)  # what finish() sends: the producer is done
        writer.start()  # both queued before it runs: the write happens in the last flush
        writer.join(timeout=30)
        assert not writer.is_alive(), "the writer hung after a failed last flush"
        assert isinstance(writer.error, StoreError)


def _manifest(store):
    """Every file of a store with its size and content digest (byte for byte), and the bytes allocated."""
    import hashlib

    files = [p for p in sorted(store.rglob("*")) if p.is_file()]
    return ({str(p.relative_to(store)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files},
            sum(p.stat().st_blocks * 512 for p in files))


def _leave_free(where, megabytes):
    """A filler file that leaves about this much free on the mount."""
    free = shutil.disk_usage(where).free - megabytes * 2**20
    filler = where / "filler"
    subprocess.run(["fallocate", "-l", str(max(free, 0)), str(filler)], check=True)
    return filler


def test_a_sync_refused_for_space_leaves_the_store_byte_for_byte_as_it_was(lpsb, tmp_path, mount):
    """Opening a shard for writing fills its vector chunks and payload indexes (~48 MB for this one on
    tmpfs), a new collection takes a shard more: refused before either, nothing of the store changes
    (no generation moved, no m3d.json, no file grown), and once there is room the same sync finishes."""
    where, _ = mount
    tree = make_tree(lpsb, tmp_path / "meshes", {"Cup": 2, "Fish": 2})
    store = where / "store"
    assert _m3d("sync", str(tree), *SYNC, "--store", str(store)).returncode == 0
    before = _manifest(store)
    filler = _leave_free(where, 30)
    more = ["--encoders", "hog", "--pools", "mean,max", "--workers", "0"]
    refused = _m3d("sync", str(tree), *more, "--store", str(store))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "no space left" in refused.stderr and "this write needs" in refused.stderr, refused.stderr
    after = _manifest(store)
    assert after[0] == before[0] and after[1] <= before[1] + (1 << 20)  # not the 48 MB an opened shard fills
    filler.unlink()
    done = _m3d("sync", str(tree), *more, "--store", str(store))
    assert done.returncode == 0, done.stderr
    assert _points(store) == {"m3d_hog_mean": 4, "m3d_hog_max": 4}
    assert runner.invoke(app, ["check", "--store", str(store)]).exit_code == 0


def test_the_room_a_sync_asks_for_is_the_work_it_has_to_do(lpsb, tmp_path, mount):
    """With every shard's files already filled, a sync adding one mesh needs a few MB: it runs with 20 MB
    free (a fixed 64 MB spare refused it, and every sync after it)."""
    where, _ = mount
    tree = make_tree(lpsb, tmp_path / "meshes", {"Cup": 2}, copy=True)
    store = where / "store"
    assert _m3d("sync", str(tree), *SYNC, "--store", str(store)).returncode == 0
    assert _m3d("sync", str(tree), *SYNC, "--store", str(store)).returncode == 0  # opened for writing once
    _leave_free(where, 20)
    shutil.copyfile(lpsb / "Cup" / "23.off", tree / "Cup" / "train" / "23.off")
    added = _m3d("sync", str(tree), *SYNC, "--store", str(store), "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["added"] == 1 and _points(store) == {"m3d_hog_mean": 3}
