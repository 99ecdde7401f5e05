"""The engines against each other. The Ray engine on a real local Ray (2 CPUs, one start for the module):
the same points as the local engine (hog and neural checkpoints), the same skips, nothing embedded on an
unchanged re-sync, a file that kills its render actor skipped alone while the others on that actor are
retried, and kill -9 of the driver then the same command converging to the uninterrupted result. The
local engine on the same poisonous file, and with render workers that cannot start."""

import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import ray

from m3d.pipeline import EXIT_SKIPPED, SyncOptions, sync
from m3d.pipeline.engines import CRASHED
from m3d.pipeline.stages import CRASH_ENV
from m3d.store import open_session

from helpers import make_tree, wait_for_first_write

CLASSES = {"Airplane": 3, "Chair": 3, "Cup": 3}
ARGS = dict(encoders=("hog",), pools=("mean", "attn", "views"), batch_size=16)
LOCAL = SyncOptions(**ARGS, workers=0)
RAY = SyncOptions(**ARGS, workers=2, engine="ray")
POISON = "Cup/train/22.off"


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 << 20, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tree(lpsb, tmp_path_factory):
    root = make_tree(lpsb, tmp_path_factory.mktemp("ray") / "meshes", CLASSES)
    (root / "Cup" / "train" / "bad.off").write_text("OFF\n3 1 0\n0 0 0\n1 1\n")
    (root / "Cup" / "train" / "empty.off").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """The local engine's store of the tree: what every Ray run must reproduce."""
    store = tmp_path_factory.mktemp("local")
    with open_session(store) as session:
        report = sync(session, tree, LOCAL)
    return report, _points(store)


def _points(store_dir) -> dict:
    with open_session(store_dir) as session:
        assert all(row["ok"] for row in session.check())  # FAISS in step, one fingerprint, no damage
        return {name: {r.id: (r.payload, r.vector) for r in session.vectors.records(name, vectors=True)}
                for name in session.collections()}


def _assert_same(got: dict, want: dict, without: set[str] = frozenset()) -> None:
    assert got.keys() == want.keys() == {"m3d_hog_mean", "m3d_hog_attn", "m3d_hog_views"}
    for name, points in want.items():
        kept = {pid: point for pid, point in points.items() if point[0]["path"] not in without}
        assert got[name].keys() == kept.keys()
        for pid, (payload, vector) in kept.items():
            assert got[name][pid][0] == payload
            np.testing.assert_allclose(got[name][pid][1], vector, atol=1e-6)


def test_same_points_and_skips_as_local_and_unchanged_resync_renders_nothing(ray_cluster, tree, reference, tmp_path):
    local, want = reference
    with open_session(tmp_path / "store") as session:
        report = sync(session, tree, RAY)
        assert report.engine == "ray" and report.exit_status == EXIT_SKIPPED
        assert report.resources["cpus"] == 2 and report.resources["render_workers"] == 2
        assert (report.added, report.unchanged) == (local.added, local.unchanged) == (9, 0)
        assert sorted(map(str, report.skipped)) == sorted(map(str, local.skipped))
        assert {s["rel_path"] for s in report.skipped} == {"Cup/train/bad.off", "Cup/train/empty.off"}
        again = sync(session, tree, RAY)  # only the two bad files (never stored) are tried again
        assert (again.added, again.unchanged, again.stages.encode) == (0, 9, 0)
        assert sorted(map(str, again.skipped)) == sorted(map(str, report.skipped))
    _assert_same(_points(tmp_path / "store"), want)


def test_a_file_that_kills_its_actor_is_skipped_alone(ray_cluster, tree, reference, tmp_path, monkeypatch, caplog):
    """The render actor dies on POISON (SIGKILL): the files it had in flight are retried one at a time
    on fresh actors, POISON kills one again while alone and is the only file skipped for it."""
    monkeypatch.setenv(CRASH_ENV, POISON)
    with caplog.at_level(logging.WARNING, logger="m3d"), open_session(tmp_path / "store") as session:
        report = sync(session, tree, RAY)
    assert any("retrying its" in r.message for r in caplog.records)  # other files shared the dead actor
    reasons = {s["rel_path"]: s["reason"] for s in report.skipped}
    assert reasons.pop(POISON) == CRASHED
    assert set(reasons) == {"Cup/train/bad.off", "Cup/train/empty.off"}
    _assert_same(_points(tmp_path / "store"), reference[1], without={POISON})


def test_the_local_engine_skips_the_same_file(tree, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, POISON)
    with open_session(tmp_path / "store") as session:
        report = sync(session, tree, SyncOptions(**ARGS, workers=2))
    assert {s["rel_path"]: s["reason"] for s in report.skipped}[POISON] == CRASHED
    _assert_same(_points(tmp_path / "store"), reference[1], without={POISON})


def test_kill_9_of_the_driver_then_the_same_command_converges(ray_cluster, tree, reference, tmp_path):
    """A driver joined to the running cluster (RAY_ADDRESS) is killed after its first write; the same
    sync again completes the store, equal to the uninterrupted local run."""
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "m3d.cli", "-v", "sync", str(tree), "--store", str(store), "--engine", "ray",
           "--workers", "2", "--encoders", "hog", "--pools", "mean,attn", "--batch-size", "16"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_cluster})
    wait_for_first_write(proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    with open_session(store) as session:
        partial = sum(session.vectors.count(name) for name in session.collections())
        report = sync(session, tree, RAY)
    assert 0 < partial and report.unchanged + report.added == 9 and report.unchanged < 9
    _assert_same(_points(store), reference[1])


def test_engine_options_are_checked_before_anything_runs(tree, tmp_path):
    from typer.testing import CliRunner

    from m3d.cli import app

    runner = CliRunner()
    for args, message in ((["--engine", "spark"], "unknown engine 'spark'; choose from local, ray"),
                          (["--engine", "ray", "--workers", "0"], "at least one render actor"),
                          (["--ray-address", "head:6379"], "--ray-address needs --engine ray")):
        result = runner.invoke(app, ["sync", str(tree), "--store", str(tmp_path / "s"), "--encoders", "hog", *args])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1
        assert not (tmp_path / "s").exists()  # refused before the store was opened
    # RAY_ADDRESS in the environment is for Ray (ray.init reads it); a local sync does not use or refuse it
    result = runner.invoke(app, ["sync", str(tree), "--store", str(tmp_path / "s"), "--encoders", "hog", "--pools", "mean",
                                 "--limit", "1", "--workers", "0"], env={"RAY_ADDRESS": "head:6379"})
    assert result.exit_code == 0 and "engine: local" in result.output, result.output


def test_neural_checkpoints_give_the_same_vectors_on_ray(ray_cluster, tree, ckpts, tmp_path):
    """Tiny random CLIP and DINOv2 checkpoints loaded by the encode actor from their directories: the
    same collections and vectors as the local engine, whatever the batches held."""
    neural = dict(encoders=(str(ckpts["clip"]), str(ckpts["dinov2"])), pools=("mean", "views"), precision="fp32",
                  batch_size=24)
    stores = {}
    for engine, workers in (("local", 0), ("ray", 2)):
        stores[engine] = tmp_path / engine
        with open_session(stores[engine]) as session:
            sync(session, tree, SyncOptions(**neural, workers=workers, engine=engine))
    want, got = _points(stores["local"]), _points(stores["ray"])
    assert got.keys() == want.keys() and len(want) == 4
    for name in want:
        assert got[name].keys() == want[name].keys() and len(want[name]) == 9
        for pid, (payload, vector) in want[name].items():
            assert got[name][pid][0] == payload
            np.testing.assert_allclose(got[name][pid][1], vector, atol=1e-6)


def test_a_render_worker_that_cannot_start_stops_the_local_sync_in_one_line(tree, tmp_path, monkeypatch):
    """No usable EGL in the render processes (here: libglvnd pointed at no vendor): one error naming
    the cause, not every file skipped as crashed, and nothing stored."""
    from m3d.errors import M3DError

    monkeypatch.setenv("__EGL_VENDOR_LIBRARY_FILENAMES", str(tmp_path / "no-vendor.json"))
    with open_session(tmp_path / "store") as session:
        with pytest.raises(M3DError, match=r"render worker could not start: .*EGL"):
            sync(session, tree, SyncOptions(**ARGS, workers=2))
        assert all(session.vectors.count(name) == 0 for name in session.collections())


def test_a_cluster_address_nothing_answers_at_is_one_line(tree, tmp_path):
    """ray.init retries an address with no cluster for ever; the sync says so at once (exit 1)."""
    import socket

    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "m3d.cli", "sync", str(tree), "--encoders", "hog", "--pools", "mean",
                             "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--store", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
