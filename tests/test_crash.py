"""kill -9 a real `m3d sync` at several moments, run it again, and compare with an uninterrupted run:
same points in every collection, same vectors and payloads, FAISS in step, nothing duplicated."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from m3d.pipeline import SyncOptions, sync
from m3d.store import open_session

from helpers import make_tree

ARGS = ["--encoders", "hog", "--pools", "mean,attn", "--workers", "0", "--batch-size", "8"]

# (stderr line that marks the moment, how many such lines to see before the kill)
KILL_POINTS = [
    ("startup", 0),  # killed 0.8 s after start: imports, lock, collection creation
    ("plan:", 1),  # right after planning, before anything is written
    ("upserted", 1),  # after the first write
    ("upserted", 7),  # in the middle of the writes
    ("faiss index", 1),  # while FAISS indexes are being rebuilt
]


def _snapshot(store_dir):
    with open_session(store_dir) as session:
        out = {}
        for name in session.collections():
            records = {r.id: r for r in session.vectors.records(name, vectors=True)}
            out[name] = {
                "payloads": {pid: (r.payload["path"], r.payload["content_hash"], r.payload["pipeline"]) for pid, r in records.items()},
                "vectors": {pid: r.vector for pid, r in records.items()},
                "count": session.vectors.count(name),
                "faiss": sorted(session.exact(name).ids),
                "check": session.check(),
            }
        return out


def _run_and_kill(tree, store_dir, marker, nth):
    cmd = [sys.executable, "-m", "m3d.cli", "-v", "sync", str(tree), "--store", str(store_dir), *ARGS]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if marker == "startup":
        time.sleep(0.8)
    else:
        seen = 0
        for line in proc.stderr:
            if marker in line:
                seen += 1
                if seen >= nth:
                    break
        else:
            proc.wait()
            pytest.fail(f"sync ended before {nth} x {marker!r}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode


@pytest.fixture(scope="module")
def tree(lpsb, tmp_path_factory):
    return make_tree(lpsb, tmp_path_factory.mktemp("crash") / "meshes", {"Airplane": 4, "Chair": 4, "Cup": 4})


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("reference")
    with open_session(store_dir) as session:
        sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean", "attn"), workers=0, batch_size=8))
    return _snapshot(store_dir)


@pytest.mark.parametrize("marker,nth", KILL_POINTS, ids=[f"{m}-{n}" for m, n in KILL_POINTS])
def test_kill_9_then_rerun_equals_uninterrupted(tree, reference, tmp_path, marker, nth):
    store_dir = tmp_path / "store"
    code = _run_and_kill(tree, store_dir, marker, nth)
    assert code == -signal.SIGKILL
    with open_session(store_dir) as session:  # the lock died with the process; the rerun completes
        report = sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean", "attn"), workers=0, batch_size=8))
    assert report.added + report.unchanged == 12 and report.skipped == []
    got = _snapshot(store_dir)
    assert got.keys() == reference.keys() == {"m3d_hog_mean", "m3d_hog_attn"}
    for name, want in reference.items():
        have = got[name]
        assert have["count"] == 12 and have["payloads"] == want["payloads"]
        assert have["faiss"] == want["faiss"] == sorted(want["payloads"])
        assert all(row["ok"] for row in have["check"])
        for pid, vector in want["vectors"].items():
            np.testing.assert_allclose(have["vectors"][pid], vector, atol=1e-6)


def _sync_with_render_workers(tree: Path, store_dir: Path, *extra: str, stdout: int, count: int):
    """A real `m3d sync` with two render worker processes, returned once it has planned and `count` of
    its workers are up (or 30 s have passed): (the process, its render worker processes)."""
    import psutil

    cmd = [sys.executable, "-m", "m3d.cli", "-v", "sync", str(tree), "--store", str(store_dir), *extra,
           *[a if a != "0" else "2" for a in ARGS]]  # two render worker processes
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=stdout, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stderr:
        if "plan:" in line:
            break
    deadline = time.monotonic() + 30
    workers = []
    while len(workers) < count and time.monotonic() < deadline:
        workers = _render_workers(psutil.Process(proc.pid))
        time.sleep(0.05)
    return proc, workers


def _render_workers(process) -> list:
    """The render worker processes of a sync (their command line runs m3d's render worker boot)."""
    import psutil

    found = []
    for child in process.children():
        try:
            if "m3d.pipeline.engines.local" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # ended (or a zombie) meanwhile
            pass
    return found


def test_a_render_worker_killed_mid_sync_loses_nothing(tree, reference, tmp_path):
    """The OOM killer (or a driver crash) takes a render worker: the files it had in flight are
    retried one at a time in a fresh pool and the sync completes with every object."""
    store_dir = tmp_path / "store"
    proc, workers = _sync_with_render_workers(tree, store_dir, "--json", stdout=subprocess.PIPE, count=1)
    assert workers, "no render worker process found"
    workers[0].kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    summary = json_loads_last(out)
    assert summary["added"] == 12 and summary["skipped"] == 0
    got = _snapshot(store_dir)
    for name, want in reference.items():
        assert got[name]["payloads"] == want["payloads"] and got[name]["faiss"] == want["faiss"]


def json_loads_last(text: str) -> dict:
    import json

    return json.loads(text[text.index("{"):])


def test_render_workers_exit_when_the_sync_is_killed(tree, tmp_path):
    """kill -9 of the main process must not leave render workers behind (each holds a GL context and
    ~200 MB): they notice their parent is gone and exit."""
    import psutil

    proc, workers = _sync_with_render_workers(tree, tmp_path / "store", stdout=subprocess.DEVNULL, count=2)
    assert len(workers) == 2, "render workers not found"
    proc.kill()
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} render workers outlived their parent"


@pytest.mark.parametrize("after,delay", [("start", 0.2), ("start", 1.5), ("child", 0.0), ("child", 0.3),
                                         ("child", 1.0), ("child", 2.5), ("child", 5.0)])
def test_no_process_outlives_a_sync_killed_while_its_workers_start(tree, tmp_path, after, delay):
    """kill -9 of the sync `delay` s after it starts, or after its first child process appears (the
    up-axis evidence processes, then the render workers): booting, importing m3d, making a GL context,
    measuring, rendering. Nothing it started may survive: killed in start-up, multiprocessing's workers
    blocked for good on a queue whose write end they hold themselves, with their resource tracker."""
    import psutil

    cmd = [sys.executable, "-m", "m3d.cli", "sync", str(tree), "--store", str(tmp_path / "store"),
           *[a if a != "0" else "2" for a in ARGS]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while after == "child" and not parent.children() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    seen: dict[int, psutil.Process] = {}  # every process the sync started until the kill, gone or not
    until = time.monotonic() + delay
    while True:
        try:
            seen.update((c.pid, c) for c in parent.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        if time.monotonic() >= until:
            break
        time.sleep(0.02)
    started = list(seen.values())
    assert started or after == "start", "the sync started no process"
    proc.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(started, timeout=20)
    left = [" ".join(p.cmdline())[:120] for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not left, f"outlived the sync: {left}"
