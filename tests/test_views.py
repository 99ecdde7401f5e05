"""View settings as one value: up axes, layouts, pca pose, the fingerprint, and stores written before
these settings existed (real meshes, real renderers, real store)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from m3d.cli import app
from m3d.meshio import Mesh, load_mesh, write_off
from m3d.orientation import AXIS_ROTATIONS, pca_rotation, pose
from m3d.pipeline import SyncOptions, sync
from m3d.render import ViewSettings, camera_positions, cameras, create_renderer, posed
from m3d.schemas import LEGACY_VIEW, Fingerprint
from m3d.search import query
from m3d.store import open_session

from helpers import RAYCAST, make_tree, needs_open3d

runner = CliRunner()
CHAIR, PLANE = "Chair/101.off", "Airplane/61.off"
# Proper rotations (det +1) that take a y-up mesh into other conventions (DESIGN.md, Orientation).
Y_TO_Z = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # (x, y, z) -> (x, -z, y)
Y_TO_X = np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])  # (x, y, z) -> (y, z, x)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = (a != 255).any(-1), (b != 255).any(-1)
    return float((sa & sb).sum() / (sa | sb).sum())


def _render(mesh: Mesh, view: ViewSettings) -> np.ndarray:
    renderer = create_renderer(view)
    try:
        return renderer.render(posed(mesh, pose(mesh, view).rotation))
    finally:
        renderer.close()


@pytest.fixture(scope="module")
def chair(lpsb) -> Mesh:
    return load_mesh(lpsb / CHAIR)


def test_axis_rotations_are_proper_and_undo_the_conventions():
    for up, rot in AXIS_ROTATIONS.items():
        assert np.allclose(rot @ rot.T, np.eye(3)) and np.isclose(np.linalg.det(rot), 1.0), up
        axis = {"x": 0, "y": 1, "z": 2}[up.lstrip("-")]
        direction = np.eye(3)[axis] * (-1 if up.startswith("-") else 1)
        assert np.allclose(rot @ direction, [0, 1, 0]), up  # the named axis becomes the cameras' up
    assert np.allclose(AXIS_ROTATIONS["z"] @ Y_TO_Z, np.eye(3))
    assert np.allclose(AXIS_ROTATIONS["x"] @ Y_TO_X, np.eye(3))


@pytest.mark.parametrize("renderer", ["moderngl", RAYCAST])
def test_converted_mesh_with_its_up_renders_like_the_original(chair, renderer):
    """A y-up chair written z-up or x-up, rendered with --up z / --up x: the original's pixels; with the
    wrong up it is a different picture (the check discriminates)."""
    base = ViewSettings(views=4, size=96, renderer=renderer, up="y")  # fixed +y: the mesh's own frame
    original = _render(chair, base)
    for conversion, up in ((Y_TO_Z, "z"), (Y_TO_X, "x")):
        converted = posed(chair, conversion)
        again = _render(converted, ViewSettings(views=4, size=96, renderer=renderer, up=up))
        assert all(_iou(a, b) > 0.99 for a, b in zip(again, original)), up
        wrong = _render(converted, base)
        assert np.mean([_iou(a, b) for a, b in zip(wrong, original)]) < 0.7, up


def test_sphere_layout_spreads_cameras_evenly_with_level_horizons():
    view = ViewSettings(views=12, layout="sphere")
    eyes = camera_positions(view)
    dirs = eyes / np.linalg.norm(eyes, axis=1, keepdims=True)
    assert np.allclose(np.linalg.norm(eyes, axis=1), np.linalg.norm(eyes[0]))
    gram = dirs @ dirs.T
    np.fill_diagonal(gram, -1)
    nearest = np.degrees(np.arccos(gram.max(axis=1)))
    assert nearest.min() > 45 and nearest.max() < 75  # 12 points: every neighbour 45-75 degrees away
    assert abs(dirs.mean(axis=0)).max() < 0.1  # no hemisphere favoured
    assert dirs[:, 1].max() > 0.85 and dirs[:, 1].min() < -0.85  # from above and from below
    for cam in cameras(view):
        assert abs(cam.right[1]) < 1e-12 and cam.up[1] > 0  # level horizon, up axis up in every view
        assert np.allclose(np.cross(cam.right, cam.up), cam.back)
    ring = camera_positions(ViewSettings(views=12))
    assert np.allclose(ring[:, 1], ring[0, 1])  # the ring keeps one elevation


@needs_open3d
def test_both_renderers_agree_on_the_sphere(chair):
    view = ViewSettings(views=12, size=128, layout="sphere")
    a = _render(chair, view)
    b = _render(chair, ViewSettings(views=12, size=128, layout="sphere", renderer="raycast"))
    for i in range(12):
        assert _iou(a[i], b[i]) > 0.95, i
        assert float(np.abs(a[i].astype(np.int16) - b[i]).mean()) < 2.5, i


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_pca_pose_is_the_same_whatever_the_rotation(chair):
    """--align pca: a chair turned any way lands in the same pose (deterministic sign rule)."""
    rng = np.random.default_rng(3)
    ref = pca_rotation(chair)
    assert np.allclose(ref @ ref.T, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(ref), 1.0)
    view = ViewSettings(views=6, size=96, layout="sphere", align="pca")
    original = _render(chair, view)
    for _ in range(3):
        turned = posed(chair, _random_rotation(rng))
        again = _render(turned, view)
        assert np.mean([_iou(a, b) for a, b in zip(again, original)]) > 0.97
    with pytest.raises(Exception, match="align"):
        ViewSettings(align="pca", up="z")


def test_fingerprint_holds_the_view_and_reads_old_points():
    view = ViewSettings(views=12, layout="sphere", up="z")
    fp = Fingerprint(encoder="hog", model_id="hog-v1", pool="mean", view=view)
    payload = fp.to_payload()
    assert Fingerprint.from_payload(payload) == fp and fp.matches(payload)
    old = {"encoder": "hog", "model_id": "hog-v1", "pool": "mean", "views": 8, "elevation": 20.0,
           "resolution": 224, "renderer": "moderngl"}  # a point written before up/layout/align existed
    legacy = Fingerprint.from_payload(old)
    assert (legacy.view.up, legacy.view.layout, legacy.view.align) == ("y", "ring", "none") == tuple(LEGACY_VIEW.values())
    assert legacy.matches(old) and not fp.matches(old)
    assert set(fp.differences(legacy)) == {"views: 8 -> 12", "elevation: 20.0 -> None", "up: 'y' -> 'z'",
                                           "layout: 'ring' -> 'sphere'"}


def test_a_store_written_before_view_settings_keeps_working(lpsb, tmp_path):
    """Points with the old payload shape (no up/layout/align, no pose), written through the real store:
    info reports ring/+y/no align, query finds them, a sync with the same settings embeds nothing, and
    another setting is refused with the difference named."""
    tree = make_tree(lpsb, tmp_path / "meshes", {"Chair": 2, "Cup": 2})
    store = tmp_path / "store"
    hog = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=ViewSettings(up="y"))
    with open_session(store) as session:
        sync(session, tree, hog)
        records = list(session.vectors.records("m3d_hog_mean", vectors=True))
        old_shape = []
        for rec in records:
            payload = {k: v for k, v in rec.payload.items() if k != "pose"}
            payload["pipeline"] = {k: payload["pipeline"][k] for k in
                                   ("encoder", "model_id", "pool", "views", "elevation", "resolution", "renderer")}
            old_shape.append(payload)
        session.vectors.upsert("m3d_hog_mean", [r.id for r in records], np.stack([r.vector for r in records]), old_shape)
        assert all("up" not in r.payload["pipeline"] for r in session.vectors.records("m3d_hog_mean"))

    out = runner.invoke(app, ["info", "--store", str(store), "--json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)["collections"]
    assert (row["up"], row["layout"], row["align"], row["views"], row["size"]) == ("y", "ring", "none", 8, 224)

    with open_session(store) as session:
        hit = query(session, tree / "Cup" / "train" / "21.off", collection="m3d_hog_mean", k=1).hits[0]
        assert hit.payload["path"] == "Cup/train/21.off" and hit.score == pytest.approx(1.0, abs=1e-3)
        again = sync(session, tree, hog)
        assert (again.added, again.updated, again.unchanged) == (0, 0, 4)  # not re-embedded
        assert all("up" not in r.payload["pipeline"] for r in session.vectors.records("m3d_hog_mean"))
        extra = tree / "Cup" / "train" / "extra.off"
        extra.write_bytes((lpsb / "Cup" / "22.off").read_bytes())
        assert sync(session, tree, hog).added == 1  # a point in today's shape beside the old ones
        (row,) = [r for r in session.check() if r["collection"] == "m3d_hog_mean"]
        assert row["fingerprints"] == 1 and row["ok"], row  # one set of settings, written two ways
        extra.unlink()
        assert sync(session, tree, hog).removed == 1
        with pytest.raises(Exception, match=r"up: 'y' -> 'auto'.*--rebuild"):  # today's default: named, refused
            sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean",), workers=0))
        with pytest.raises(Exception, match=r"layout: 'ring' -> 'sphere'.*--rebuild"):
            sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean",), workers=0,
                                            view=ViewSettings(up="y", layout="sphere")))
        rebuilt = sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean",), workers=0, rebuild=True,
                                                  view=ViewSettings(up="y", layout="sphere", views=6)))
        assert rebuilt.added == 4
        fp = session.fingerprint("m3d_hog_mean")
        assert (fp.view.layout, fp.view.views) == ("sphere", 6)
        stored = next(iter(session.vectors.records("m3d_hog_mean"))).payload
        assert stored["pose"]["up"] == "y" and np.allclose(stored["pose"]["rotation"], np.eye(3))


def test_the_sphere_has_no_elevation_and_its_first_points_still_match():
    """The sphere ignores the ring's elevation, so it neither takes one nor records one: asking for one is
    a usage error, and points written when sphere collections still recorded elevation 20 match."""
    from m3d.errors import UsageError

    with pytest.raises(UsageError, match="--elevation is for the ring only"):
        ViewSettings(layout="sphere", elevation=30)
    assert ViewSettings().elevation == 20.0 and ViewSettings(layout="sphere").elevation is None
    fp = Fingerprint("hog", "hog", "mean", ViewSettings(layout="sphere", views=12, up="y"))
    assert fp.to_payload()["elevation"] is None
    first = {**fp.to_payload(), "elevation": 20.0}  # as the first sphere collections stored it
    assert fp.matches(first) and Fingerprint.from_payload(first) == fp
    ring = Fingerprint("hog", "hog", "mean", ViewSettings(views=12, up="y"))
    assert not ring.matches({**ring.to_payload(), "elevation": 30.0})  # the ring's elevation still counts


def _write_off(path, vertices, faces):
    write_off(Mesh(vertices=np.asarray(vertices, dtype=np.float32), faces=np.asarray(faces)), path)


def _box(thickness: float, height: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A 1 x height x thickness plate standing in the x-y plane (its face towards +z)."""
    x, y, z = np.meshgrid([-0.5, 0.5], [-height / 2, height / 2], [-thickness / 2, thickness / 2], indexing="ij")
    v = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    faces = [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],
             [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
    return v, np.array(faces)


def test_views_that_do_not_show_the_object_are_left_out_not_the_object(tmp_path):
    """A sign seen edge-on by 2 of 8 level cameras: kept, pooled over the 6 views that show it (a
    plate 0 or 0.008 thick, blank or a one-pixel line: the same rule); a plate lying flat under
    level cameras is seen by none and is the only thing skipped."""
    from m3d.encoders import load_encoder
    from m3d.pooling import pool
    from m3d.render import MIN_COVERAGE, coverage

    root = tmp_path / "signs"
    square = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]])
    two = np.array([[0, 1, 2], [0, 2, 3]])
    _write_off(root / "Sign" / "flat.off", square, two)
    _write_off(root / "Sign" / "thin.off", *_box(0.008, 0.3))
    _write_off(root / "Lying" / "floor.off", square[:, [0, 2, 1]], two)  # in the x-z plane: edge-on to all
    view = ViewSettings(views=8, elevation=0.0, up="y")
    with open_session(tmp_path / "store") as session:
        report = sync(session, root, SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=view))
        assert [s["rel_path"] for s in report.skipped] == ["Lying/floor.off"]
        assert "no view shows the object" in report.skipped[0]["reason"]
        stored = {r.payload["path"]: r for r in session.vectors.records("m3d_hog_mean", vectors=True)}
        assert {p: r.payload["views_shown"] for p, r in stored.items()} == {"Sign/flat.off": 6, "Sign/thin.off": 6}
        thin = load_mesh(root / "Sign" / "thin.off")
        views = _render(thin, view)
        cov = coverage(views)
        assert 0 < cov[2] < MIN_COVERAGE and 0 < cov[6] < MIN_COVERAGE  # a line of pixels, not blank
        keep = np.array([i not in (2, 6) for i in range(8)])
        expected = pool("mean", load_encoder("hog").encode(views[keep])[None]).cpu().numpy()[0]
        assert np.allclose(stored["Sign/thin.off"].vector, expected, atol=1e-5)
