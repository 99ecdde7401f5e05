"""--up auto on real meshes: equivariant evidence, the ModelNet samples upright, converted LPSB meshes
rendered like the originals, the dataset consensus in a real sync, and a query following its collection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m3d.meshio import Mesh, load_mesh, write_off
from m3d.orientation import DIRECTIONS, consensus, convention_prior, evidence, pose
from m3d.pipeline import SyncOptions, sync
from m3d.render import ViewSettings, create_renderer, posed
from m3d.search import query
from m3d.store import open_session

MODELNET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "modelnet-samples"
Y_TO_Z = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # (x, y, z) -> (x, -z, y)
Y_TO_X = np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])  # (x, y, z) -> (y, z, x)
SMALL = ViewSettings(views=4, size=96)
# LPSB meshes with a clear up, y-up as shipped
NAMES = ["Chair/101.off", "Chair/103.off", "Chair/108.off", "Table/142.off", "Table/147.off", "Cup/21.off",
         "Human/2.off", "Vase/363.off"]


def _silhouettes(mesh: Mesh, view: ViewSettings, dataset=None) -> np.ndarray:
    renderer = create_renderer(view)
    try:
        return (renderer.render(posed(mesh, pose(mesh, view, dataset).rotation)) != 255).any(-1)
    finally:
        renderer.close()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _permuted(ev: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """The evidence vector of a mesh turned by an axis permutation: direction d moves to rotation @ d."""
    vec = {d: np.eye(3)["xyz".index(d[-1])] * (-1 if d.startswith("-") else 1) for d in DIRECTIONS}
    out = np.empty(6)
    for i, d in enumerate(DIRECTIONS):
        moved = rotation @ vec[d]
        out[next(j for j, e in enumerate(DIRECTIONS) if np.allclose(vec[e], moved))] = ev[i]
    return out


@pytest.mark.parametrize("name", ["Chair/101.off", "Human/2.off", "Table/147.off"])
def test_converted_meshes_get_the_same_pose_and_pictures(lpsb, name):
    """A y-up LPSB mesh written z-up or x-up: the same evidence (permuted), the same pictures with auto."""
    mesh = load_mesh(lpsb / name)
    ev = evidence(mesh)
    original = _silhouettes(mesh, SMALL)
    for conversion in (Y_TO_Z, Y_TO_X):
        converted = posed(mesh, conversion)
        assert np.allclose(evidence(converted), _permuted(ev, conversion), atol=1e-6)
        again = _silhouettes(converted, SMALL)
        assert min(_iou(a, b) for a, b in zip(again, original)) > 0.99
    assert pose(mesh, SMALL).up == "y"  # and these three are upright in the file's own +y


def _wide_and_low(sil: np.ndarray) -> bool:
    rows, cols = np.nonzero(sil)
    return (cols.max() - cols.min()) > 1.3 * (rows.max() - rows.min())


def test_modelnet_samples_stand_upright_with_default_settings():
    """ModelNet is z-up: a bed and an airplane alone (no dataset) are turned +z up and come out wide and
    low in most views, where the old fixed +y ring showed the bed on its end and the airplane from above
    and below. (The airplane's shape alone points -z; the file conventions' prior turns it right way up.)"""
    if not MODELNET.is_dir():
        pytest.skip("modelnet samples not found")
    view = ViewSettings(views=8, size=96)
    for name in ("bed/train/bed_0001.off", "airplane/train/airplane_0003.off"):
        mesh = load_mesh(MODELNET / name)
        assert pose(mesh, view, suffix=".off").up == "z", name
        assert sum(map(_wide_and_low, _silhouettes(mesh, view))) >= 6, name
        assert sum(map(_wide_and_low, _silhouettes(mesh, ViewSettings(views=8, size=96, up="y")))) <= 4, name


def _agreeing(n: int, direction: str, seed: int) -> np.ndarray:
    """Evidence of n objects that mildly agree on one direction (0.5 against 0.1 each, plus noise)."""
    ev = np.log(np.full((n, 6), 0.1))
    ev[:, DIRECTIONS.index(direction)] = np.log(0.5)
    return ev + np.random.default_rng(seed).normal(0, 0.1, ev.shape)


def test_consensus_flat_for_one_object_peaked_for_agreeing_ones():
    z = DIRECTIONS.index("z")
    agreeing = _agreeing(40, "z", seed=0)
    sphere = np.log(np.full(6, 1 / 6))  # no evidence either way
    confident_x = np.log(np.array([1 - 5e-12, 1e-12, 1e-12, 1e-12, 1e-12, 1e-12]))
    c = consensus(list(agreeing) + [sphere, confident_x])
    assert c.majority == "z" and c.prior[z] > 0.6
    assert c.choose(sphere) == ("z", "dataset")  # ambiguous: the dataset's convention
    assert c.choose(confident_x)[0] == "x"  # overwhelming own evidence still wins
    mixed = consensus([confident_x, _roll(confident_x, 2), _roll(confident_x, 4)])
    assert [mixed.choose(e)[0] for e in (confident_x, _roll(confident_x, 2), _roll(confident_x, 4))] == ["x", "y", "z"]
    alone = consensus([sphere]).prior  # alone: the file conventions, positive axes alike
    assert np.allclose(alone, convention_prior(".off")) and alone[z] == alone[DIRECTIONS.index("y")] > 10 * alone[z + 1]
    assert consensus([sphere], [".glb"]).choose(sphere)[0] == "y"  # glTF says +Y up


def test_a_dataset_stored_upside_down_keeps_its_own_convention():
    """The conventions' prior turns a lone ambiguous file right way up, but a dataset whose objects agree
    on -z (files stored upside down throughout) is not overruled by it."""
    agreeing = _agreeing(30, "-z", seed=1)
    c = consensus(agreeing)
    assert c.majority == "-z"
    assert all(c.choose(e)[0] == "-z" for e in agreeing)
    assert consensus(agreeing[:1]).choose(agreeing[0])[0] != "-z"  # one such file alone: the prior wins


def test_a_bad_evidence_row_does_not_vote_and_a_mixed_dataset_has_no_majority():
    agreeing = _agreeing(20, "z", seed=2)
    clean = consensus(agreeing)
    for bad in (np.full(6, np.nan), np.full(6, np.inf), np.zeros(5)):
        poisoned = consensus(list(agreeing) + [bad])
        assert poisoned.objects == 20 and np.allclose(poisoned.prior, clean.prior) and poisoned.majority == "z"
    spread = consensus([_roll(agreeing[i], 2 * (i % 3)) for i in range(len(agreeing))])  # z, x and y files
    assert spread.majority is None
    assert all(spread.choose(e)[1] == "object" for e in agreeing)
    assert consensus(agreeing[:1]).majority is None  # one file is not a dataset


def test_a_lone_file_takes_its_formats_convention(tmp_path):
    """Through a real sync: the ModelNet airplane alone is +z as OFF (no format rule: the positive axes
    alike, its shape picks z) but +y as GLB, whose spec says +Y; one file has no dataset majority."""
    import trimesh

    if not MODELNET.is_dir():
        pytest.skip("modelnet samples not found")
    mesh = load_mesh(MODELNET / "airplane" / "train" / "airplane_0003.off")
    options = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=SMALL)
    for suffix, up in ((".off", "z"), (".GLB", "y")):
        folder = tmp_path / suffix[1:] / "Airplane"
        folder.mkdir(parents=True)
        trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).export(folder / f"plane{suffix}", file_type=suffix[1:].lower())
        with open_session(tmp_path / f"store-{suffix[1:]}") as session:
            report = sync(session, folder.parent, options)
            (record,) = session.vectors.records("m3d_hog_mean")
        assert record.payload["pose"]["up"] == up, suffix
        assert report.orientation["majority"] is None and report.orientation["against_majority"] == 0


def _roll(ev: np.ndarray, k: int) -> np.ndarray:
    return np.roll(ev, k)


def test_each_file_format_keeps_its_own_convention(lpsb, tmp_path):
    """A library of 12 OBJ files y-up and 3 STL files z-up: one shared consensus turns two of the STL
    minority to the OBJ majority (+y); each format has its own, so every object is upright."""
    import trimesh

    root = tmp_path / "mixed"
    for name in NAMES + ["Chair/102.off", "Chair/107.off", "Table/143.off", "Human/3.off"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        mesh = load_mesh(lpsb / name)
        trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).export(root / name.replace(".off", ".obj"))
    for name in NAMES[:3]:
        mesh = posed(load_mesh(lpsb / name), Y_TO_Z)
        trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).export(root / name.replace(".off", ".stl"))
    options = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=SMALL)
    with open_session(tmp_path / "store") as session:
        report = sync(session, root, options)
        ups = {r.payload["path"]: r.payload["pose"]["up"] for r in session.vectors.records("m3d_hog_mean")}
    assert report.added == 15
    assert {p: u for p, u in ups.items() if p.endswith(".stl")} == {n.replace(".off", ".stl"): "z" for n in NAMES[:3]}
    assert {u for p, u in ups.items() if p.endswith(".obj")} == {"y"}
    formats = report.orientation["formats"]
    assert (formats[".obj"]["majority"], formats[".stl"]["majority"]) == ("y", "z")
    assert report.orientation["majority"] is None and report.orientation["against_majority"] == 0


def test_evidence_from_another_model_is_measured_again(lpsb, tmp_path):
    """Points whose stored evidence an older model made (no "model", other numbers): the next sync
    measures them again; where the decision stands only the pose payload is rewritten, where it moves
    the object is embedded again."""
    from m3d.orientation import EVIDENCE_MODEL

    root = tmp_path / "tree"
    for name in NAMES[:4]:
        write_off(load_mesh(lpsb / name), root / name)
    options = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=SMALL)
    with open_session(tmp_path / "store") as session:
        sync(session, root, options)
        fresh = {r.id: r.payload for r in session.vectors.records("m3d_hog_mean")}
        assert {p["pose"]["model"] for p in fresh.values()} == {EVIDENCE_MODEL}
        first, *rest = sorted(fresh)
        old = {pid: {"pose": {**{k: v for k, v in fresh[pid]["pose"].items() if k != "model"},
                              "evidence": [0.0] * 6}} for pid in rest}  # an older model's (flat) numbers
        x_up = [[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]  # and one object stored x-up on an older model's word
        old[first] = {"pose": {"up": "x", "source": "object", "rotation": x_up, "evidence": [0, -9, -9, -9, -9, -9]}}
        session.vectors.set_payload("m3d_hog_mean", old)
        again = sync(session, root, options)
        assert (again.updated, again.unchanged, again.orientation["reoriented"]) == (1, 3, 1)
        now = {r.id: r.payload for r in session.vectors.records("m3d_hog_mean")}
    assert {p["pose"]["model"] for p in now.values()} == {EVIDENCE_MODEL}
    assert all(now[pid]["pose"]["evidence"] == fresh[pid]["pose"]["evidence"] for pid in fresh)
    assert now[first]["pose"]["up"] == fresh[first]["pose"]["up"] != "x"


def test_sync_agrees_on_the_datasets_convention_and_queries_follow_it(lpsb, tmp_path):
    """A tree written z-up (as ModelNet is): every object is turned z-up, the summary says so, each
    payload records it; a re-sync embeds nothing; a query mesh from the same convention finds itself."""
    root = tmp_path / "zup"
    names = NAMES
    for name in names:
        write_off(posed(load_mesh(lpsb / name), Y_TO_Z), root / name)
    options = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=SMALL)
    with open_session(tmp_path / "store") as session:
        report = sync(session, root, options)
        assert report.added == len(names)
        assert report.orientation["majority"] == "z" and report.orientation["objects"] == len(names)
        poses = {r.payload["path"]: r.payload["pose"] for r in session.vectors.records("m3d_hog_mean")}
        assert {p["up"] for p in poses.values()} == {"z"}
        assert report.orientation["against_majority"] == 0
        assert all(len(p["evidence"]) == 6 and np.allclose(p["rotation"], [[1, 0, 0], [0, 0, 1], [0, -1, 0]])
                   for p in poses.values())
        again = sync(session, root, options)
        assert (again.added, again.updated, again.unchanged) == (0, 0, len(names))
        hit = query(session, root / "Cup" / "21.off", collection="m3d_hog_mean", k=1).hits[0]
        assert hit.payload["path"] == "Cup/21.off" and hit.score == pytest.approx(1.0, abs=1e-4)
