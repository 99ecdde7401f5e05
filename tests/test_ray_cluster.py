"""The Ray engine beyond one local node, and the Ray it starts itself.

A Ray that m3d starts goes down with its driver: a finished sync leaves no process behind, and neither
does a kill -9 of the driver mid-sync; Ray's own token notice never reaches the user's stderr.
Then a ray.cluster_utils.Cluster on this machine (a head and two nodes, each with its own resources,
one advertising a GPU): the encode actor lands on the GPU node (encoding on its CPU: there is no CUDA
here) and the render actors elsewhere, and the store equals the local engine's; a node removed in the
middle of a sync loses nothing and the sync converges; every process of the cluster is gone after it.
Small on purpose: 6 meshes, 4 views of 128 px, one CPU per node."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

ray = pytest.importorskip("ray")

from m3d.errors import M3DError
from m3d.pipeline import SyncOptions, sync
from m3d.pipeline.engines.ray import TOKEN_NOTICE, _DropTokenNotice
from m3d.render import ViewSettings
from m3d.store import open_session

from helpers import make_tree, wait_for_first_write

CLASSES = {"Airplane": 2, "Chair": 2, "Cup": 2}
VIEW = ViewSettings(views=4, size=128)  # 196 KB of views per object: in the object store, not inlined (100 KB)
ARGS = dict(encoders=("hog",), pools=("mean", "attn"), batch_size=8, view=VIEW)
CLI = ["--encoders", "hog", "--pools", "mean", "--views", "4", "--size", "128", "--batch-size", "4",
       "--engine", "ray", "--workers", "1"]


@pytest.fixture(scope="module")
def tree(lpsb, tmp_path_factory):
    return make_tree(lpsb, tmp_path_factory.mktemp("cluster") / "meshes", CLASSES)


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    store = tmp_path_factory.mktemp("local")
    with open_session(store) as session:
        sync(session, tree, SyncOptions(**ARGS, workers=0))
    return _points(store)


def _points(store_dir) -> dict:
    with open_session(store_dir) as session:
        assert all(row["ok"] for row in session.check())
        return {name: {r.id: (r.payload, r.vector) for r in session.vectors.records(name, vectors=True)}
                for name in session.collections()}


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() == {"m3d_hog_mean", "m3d_hog_attn"}
    for name, points in want.items():
        assert got[name].keys() == points.keys() and len(points) == 6
        for pid, (payload, vector) in points.items():
            assert got[name][pid][0] == payload
            np.testing.assert_allclose(got[name][pid][1], vector, atol=1e-6)  # hog: float32 sums, same code


def _cli_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # the driver starts its own local Ray
    return env


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return ""


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # psutil knows a reused pid
    except psutil.Error:
        return False


def _wait_gone(processes: list[psutil.Process], seconds: float = 60.0) -> list[str]:
    """The command lines of what is still running of these processes after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() > deadline:
            return [_cmd(p)[:120] for p in alive]
        time.sleep(0.5)


def _ray_family(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


# -- the local Ray m3d starts ---------------------------------------------------------------------
def test_a_finished_sync_leaves_no_ray_process_and_no_ray_notice(tree, tmp_path):
    """Every process the sync started (the keeper, Ray's head, agents and actors' workers), collected
    while it ran, is gone when it returns; stderr carries m3d's lines only."""
    proc = subprocess.Popen([sys.executable, "-m", "m3d.cli", "sync", str(tree), "--store", str(tmp_path / "s"), *CLI],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env())
    seen: dict[int, tuple[psutil.Process, str]] = {}
    while proc.poll() is None:
        for p in _ray_family(proc.pid):
            seen.setdefault(p.pid, (p, _cmd(p)))
        time.sleep(0.3)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert "6 added" in stdout and "engine: ray" in stdout
    assert any("raylet" in cmd for _, cmd in seen.values())  # Ray ran under the driver
    assert _wait_gone([p for p, _ in seen.values()], 30) == []
    assert TOKEN_NOTICE not in stderr and "Ray" not in stderr, stderr


def test_kill_9_of_a_driver_that_started_its_own_ray_leaves_no_ray_process(tree, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "m3d.cli", "-v", "sync", str(tree), "--store", str(tmp_path / "s"),
                             *CLI], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_cli_env())
    wait_for_first_write(proc)
    family = _ray_family(proc.pid)
    names = " ".join(map(_cmd, family))
    assert "m3d.pipeline.engines.ray" in names and "raylet" in names  # Ray was running under the driver
    proc.kill()
    assert proc.wait(timeout=30) == -9
    keeper = next(p.pid for p in family if "m3d.pipeline.engines.ray" in _cmd(p))
    assert _wait_gone(family) == []
    assert [_cmd(p) for p in psutil.process_iter() if _group(p) == keeper and _running(p)] == []


def _group(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def test_only_rays_token_notice_is_dropped():
    keep = _DropTokenNotice()

    def record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("ray", level, __file__, 1, message, None, None)

    assert not keep.filter(record(TOKEN_NOTICE + " for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."))
    assert keep.filter(record("Token authentication is disabled for this Ray cluster. Anyone with network access"))
    assert keep.filter(record("could not connect to GCS", logging.ERROR))


# -- a cluster of several nodes on this machine -----------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    store = 80 << 20
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
    render = nodes.add_node(num_cpus=1, object_store_memory=store)
    gpu = nodes.add_node(num_cpus=1, num_gpus=1, object_store_memory=store)  # advertised; no CUDA here
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, logging_level=logging.WARNING)
    yield nodes, render, gpu
    ray.shutdown()
    nodes.shutdown()


def test_encoders_land_where_the_gpu_is_advertised_and_renderers_elsewhere(cluster, tree, reference, tmp_path):
    nodes, render, gpu = cluster
    with open_session(tmp_path / "store") as session:
        report = sync(session, tree, SyncOptions(**ARGS, engine="ray"))
    r = report.resources
    assert (r["cpus"], r["gpus"], r["nodes"]) == (3, 1, 3)
    assert r["encode_device"] == "cpu" and r["encode_workers"] == 1 and r["render_workers"] == 2
    assert r["placement"]["encode"] == {gpu.node_id: 1}
    assert gpu.node_id not in r["placement"]["render"] and sum(r["placement"]["render"].values()) == 2
    assert set(r["placement"]["render"]) == {nodes.head_node.node_id, render.node_id}
    _assert_same(_points(tmp_path / "store"), reference)


def test_a_node_removed_in_the_middle_of_a_sync_loses_nothing(cluster, tree, reference, tmp_path, caplog):
    """A third CPU node joins and holds a render actor; it is removed once the sync has work in flight.
    Its tasks go to the other actors (or the rerun does them): the store equals the local engine's."""
    nodes, _, _ = cluster
    doomed = nodes.add_node(num_cpus=1, object_store_memory=80 << 20)
    nodes.wait_for_nodes()
    removed = []

    def remove_once(done: int, total: int, report) -> None:
        if not removed and report.resources:  # the actors are placed and tasks are in flight
            assert doomed.node_id in report.resources["placement"]["render"]
            nodes.remove_node(doomed)
            removed.append(done)

    with caplog.at_level(logging.WARNING, logger="m3d"), open_session(tmp_path / "store") as session:
        try:
            sync(session, tree, SyncOptions(**ARGS, engine="ray"), progress=remove_once)
        except M3DError:  # the sync may stop; what it wrote stays and the rerun completes it
            pass
        assert removed, "the node was never removed"
        rerun = sync(session, tree, SyncOptions(**ARGS, engine="ray"))
    assert any("node left the cluster" in r.message or "lost with a Ray node" in r.message for r in caplog.records)
    assert rerun.added + rerun.unchanged == 6 and not rerun.skipped
    _assert_same(_points(tmp_path / "store"), reference)


def test_views_lost_with_a_node_are_rendered_again(cluster, tree, reference, tmp_path, monkeypatch, caplog):
    """The node goes after every object is rendered and before the one batch (64 images: all six objects)
    is encoded: the views that lived in its object store are gone, the encode call fails on them, the
    batch is rendered again on the other actors, and the store equals the local engine's."""
    from m3d.pipeline.engines import ray as engine

    nodes, _, _ = cluster
    doomed = nodes.add_node(num_cpus=1, object_store_memory=80 << 20)
    nodes.wait_for_nodes()
    send = engine._Scheduler._encode
    removed = []

    def remove_then_send(self, batch, attempt):
        if not removed:
            assert doomed.node_id in self.job.tally.report.resources["placement"]["render"]
            nodes.remove_node(doomed)
            removed.append(len(batch))
        send(self, batch, attempt)

    monkeypatch.setattr(engine._Scheduler, "_encode", remove_then_send)
    with caplog.at_level(logging.WARNING, logger="m3d"), open_session(tmp_path / "store") as session:
        report = sync(session, tree, SyncOptions(**{**ARGS, "batch_size": 64}, engine="ray"))
    assert removed == [6] and report.added == 6 and not report.skipped
    assert any("lost with a Ray node" in r.message for r in caplog.records)
    _assert_same(_points(tmp_path / "store"), reference)


def test_every_process_of_the_cluster_is_gone_afterwards(cluster):
    nodes, _, _ = cluster
    family = [p for p in psutil.Process().children(recursive=True) if "ray" in _cmd(p)]  # not multiprocessing's
    assert any("raylet" in _cmd(p) for p in family) and any("gcs_server" in _cmd(p) for p in family)
    ray.shutdown()
    nodes.shutdown()
    assert _wait_gone(family) == []
