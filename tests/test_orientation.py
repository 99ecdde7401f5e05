"""--up auto on real meshes: equivariant evidence, the ModelNet samples upright, converted LPSB meshes
rendered like the originals, the dataset consensus in a real sync, and a query following its collection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m3d.meshio import Mesh, load_mesh, write_off
from m3d.orientation import DIRECTIONS, UP_KEY, DatasetUp, alone, consensus, convention_prior, decide_rule, evidence, pose
from m3d.pipeline import SyncOptions, sync
from m3d.render import ViewSettings, create_renderer, posed
from m3d.search import collection_consensus, query
from m3d.store import open_session

MODELNET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "modelnet-samples"
Y_TO_Z = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # (x, y, z) -> (x, -z, y)
Y_TO_X = np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])  # (x, y, z) -> (y, z, x)
SMALL = ViewSettings(views=4, size=96)
# LPSB meshes with a clear up, y-up as shipped
NAMES = ["Chair/101.off", "Chair/103.off", "Chair/108.off", "Table/142.off", "Table/147.off", "Cup/21.off",
         "Human/2.off", "Vase/363.off"]
CUPS = ["Cup/22.off", "Cup/33.off", "Cup/39.off"]


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


def test_an_agreeing_dataset_gives_every_file_its_convention_and_a_mixed_one_only_strong_evidence_moves():
    agreeing = _agreeing(40, "z", seed=0)
    confident_x = np.log(np.array([1 - 5e-12, 1e-12, 1e-12, 1e-12, 1e-12, 1e-12]))
    rule, why = decide_rule(list(agreeing) + [confident_x], ".off", 41)
    assert (rule.up, rule.agree, why) == ("z", True, None) and rule.prior[DIRECTIONS.index("z")] > 0.6
    assert rule.decide(None) == ("z", "dataset") and not rule.needs_evidence  # even the confident x file
    spread = [np.roll(agreeing[i], 2 * (i % 3)) for i in range(len(agreeing))]  # z, x and y files
    mixed, _ = decide_rule(spread, ".off", len(spread))
    assert not mixed.agree and mixed.needs_evidence
    assert mixed.decide(spread[0]) == (mixed.up, "format")  # mild evidence keeps the convention
    others = [d for d in ("x", "y", "z") if d != mixed.up]
    strong = np.full(6, -20.0)
    strong[DIRECTIONS.index(others[0])] = 0.0
    assert mixed.decide(strong) == (others[0], "object")
    upside_down = np.full(6, -20.0)
    upside_down[DIRECTIONS.index("-" + mixed.up)] = 0.0  # files are not stored upside down: never taken
    assert mixed.decide(upside_down)[0] == mixed.up


def test_a_dataset_stored_upside_down_keeps_its_own_convention():
    """The conventions' prior turns a lone ambiguous file right way up, but a dataset whose objects agree
    on -z (files stored upside down throughout) is not overruled by it."""
    agreeing = _agreeing(30, "-z", seed=1)
    rule, _ = decide_rule(agreeing, ".off", 30)
    assert (rule.up, rule.agree) == ("-z", True)
    assert alone(agreeing[0], ".off") != "-z"  # one such file alone: the prior wins
    sphere = np.log(np.full(6, 1 / 6))
    assert np.allclose(consensus([sphere], ".off"), convention_prior(".off"))
    assert alone(sphere, ".glb") == "y" and alone(sphere, ".off") == "y"  # glTF says +Y; a tie leaves the file


def test_bad_evidence_rows_do_not_vote():
    agreeing = _agreeing(20, "z", seed=2)
    clean = consensus(agreeing)
    for bad in (np.full(6, np.nan), np.full(6, np.inf), np.zeros(5)):
        assert np.allclose(consensus(list(agreeing) + [bad]), clean)
    assert decide_rule(list(agreeing) + [np.full(6, np.nan)], ".off", 21)[0].sampled == 20


def test_hysteresis_one_file_does_not_turn_a_dataset():
    """A sample whose consensus sits just past the agreement line (or the convention's lead) keeps the
    stored rule; a move well past it changes the rule and says why."""
    base = list(_agreeing(12, "y", seed=3)) + list(_agreeing(10, "z", seed=4))
    before, _ = decide_rule(base, ".off", len(base))
    for extra in range(1, 40):  # add z files one at a time, each sync deciding against the last rule
        rows = base + list(_agreeing(extra, "z", seed=5))
        fresh, _ = decide_rule(rows, ".off", len(rows))
        kept, why = decide_rule(rows, ".off", len(rows), before)
        if not fresh.same_decisions(before):  # where a rule without memory would already move
            break
    assert not kept.same_decisions(fresh) and why is None  # the first such step: the stored rule holds
    for more in range(extra, 80):
        rows = base + list(_agreeing(more, "z", seed=5))
        moved, why = decide_rule(rows, ".off", len(rows), before)
        if not moved.same_decisions(before):
            break
    assert more > extra and why and before.describe() in why and moved.up == "z"


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
        assert report.orientation["formats"] == {suffix.lower(): {"objects": 1, "up": "each file alone", "reoriented": 0}}


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
    assert (formats[".obj"]["up"], formats[".stl"]["up"]) == ("y", "z")


def test_sync_agrees_on_the_datasets_convention_and_queries_follow_it(lpsb, tmp_path):
    """A tree written z-up (as ModelNet is): every object is turned z-up, the summary says so, each
    payload records it; a re-sync embeds nothing; a query mesh from the same convention finds itself."""
    root = tmp_path / "zup"
    names = NAMES + CUPS  # alone, these cups' own evidence turns them to another axis
    assert {alone(evidence(posed(load_mesh(lpsb / n), Y_TO_Z)), ".off") for n in CUPS} != {"z"}
    for name in names:
        write_off(posed(load_mesh(lpsb / name), Y_TO_Z), root / name)
    options = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=SMALL)
    with open_session(tmp_path / "store") as session:
        report = sync(session, root, options)
        assert report.added == len(names)
        rule = report.orientation["formats"][".off"]
        assert (rule["up"], rule["agree"], rule["objects"]) == ("z", True, len(names))
        poses = {r.payload["path"]: r.payload["pose"] for r in session.vectors.records("m3d_hog_mean")}
        assert {(p["up"], p["source"]) for p in poses.values()} == {("z", "dataset")}  # the cups too
        assert all(np.allclose(p["rotation"], [[1, 0, 0], [0, 0, 1], [0, -1, 0]]) for p in poses.values())
        again = sync(session, root, options)
        assert (again.added, again.updated, again.unchanged) == (0, 0, len(names))
        hit = query(session, root / "Cup" / "21.off", collection="m3d_hog_mean", k=1).hits[0]
        assert hit.payload["path"] == "Cup/21.off" and hit.score == pytest.approx(1.0, abs=1e-4)


# -- the rules in real syncs: planted libraries, hysteresis, stored rules ---------------------------------
POOL = ["Chair/101.off", "Chair/103.off", "Chair/108.off", "Human/2.off", "Vase/363.off", "Table/142.off",
        "Table/147.off", "Table/149.off", "Cup/21.off", "Airplane/79.off", "Chair/102.off", "Human/3.off"]
SHIPPED = {"Airplane/79.off": "z"}  # the axis that is up in the file as shipped (the others: y)
OPTIONS = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=SMALL)


def _write(lpsb: Path, root: Path, name: str, convention: str, suffix: str = ".off") -> str:
    """The LPSB mesh `name` re-saved with its true up along `convention`; returns its relative path."""
    from m3d.orientation import AXIS_ROTATIONS

    mesh = posed(load_mesh(lpsb / name), AXIS_ROTATIONS[convention].T @ AXIS_ROTATIONS[SHIPPED.get(name, "y")])
    rel = name.replace(".off", suffix)
    if suffix == ".off":
        write_off(mesh, root / rel)
    else:
        import trimesh

        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).export(root / rel)
    return rel


def _poses(session, name: str = "m3d_hog_mean") -> dict[str, dict]:
    return {r.payload["path"]: r.payload["pose"] for r in session.vectors.records(name)}


def test_a_mixed_library_never_does_worse_than_its_formats_convention(lpsb, tmp_path):
    """12 files in x, y and z conventions, no direction holding half the prior: every file keeps the
    format's convention except where its own evidence is strong, and more files stand upright than
    under that convention fixed (the best a fixed --up could do with it)."""
    truth = {_write(lpsb, tmp_path / "mixed", name, conv): conv for name, conv in zip(POOL, "yyzyzxzyzxzz")}
    with open_session(tmp_path / "store") as session:
        report = sync(session, tmp_path / "mixed", OPTIONS)
        poses = _poses(session)
    rule = report.orientation["formats"][".off"]
    assert rule["agree"] is False
    assert all(p["up"] == rule["up"] for p in poses.values() if p["source"] == "format")
    turned = [path for path, p in poses.items() if p["source"] == "object"]
    assert turned and all(len(poses[path]["evidence"]) == 6 for path in turned)  # measured in the render worker
    upright = sum(poses[path]["up"] == up for path, up in truth.items())
    assert upright > sum(up == rule["up"] for up in truth.values())


def test_one_new_file_does_not_turn_the_dataset(lpsb, tmp_path):
    """4 y-up and 2 z-up files agree (just) on y; a third z-up file would tip a rule without memory to
    'mixed', so every object would be checked and some turned. The stored rule holds: one file added,
    nothing else embedded again, and the new file takes the dataset's y."""
    root = tmp_path / "tree"
    for name in ("Chair/101.off", "Chair/103.off", "Chair/108.off", "Table/142.off"):
        _write(lpsb, root, name, "y")
    for name in ("Chair/102.off", "Chair/107.off"):
        _write(lpsb, root, name, "z")
    with open_session(tmp_path / "store") as session:
        first = sync(session, root, OPTIONS)
        assert (first.orientation["formats"][".off"]["up"], first.orientation["formats"][".off"]["agree"]) == ("y", True)
        new = _write(lpsb, root, "Table/143.off", "z")
        second = sync(session, root, OPTIONS)
        rule = second.orientation["formats"][".off"]
        assert (second.added, second.updated, second.orientation["reoriented"]) == (1, 0, 0)
        assert (rule["up"], rule["agree"], rule.get("moved")) == ("y", True, None)
        assert _poses(session)[new]["up"] == "y"
        stored = DatasetUp.from_record(session.vectors.metadata("m3d_hog_mean", UP_KEY)["tree"])
    rows = list(stored.samples[".off"].values())
    assert len(rows) == 7 and not decide_rule(rows, ".off", 7)[0].agree  # without the stored rule: mixed


def test_a_rule_that_moves_embeds_again_what_it_turns_and_nothing_else(lpsb, tmp_path):
    """5 OFF files y-up and 3 OBJ files y-up agree on y per format; 12 z-up OFF files arrive: the OFF
    rule moves to z (the summary says why and how many), the 5 old OFF objects are embedded again turned
    z, the OBJ objects are not touched, and a cold query then reads the new rule from the collection."""
    root = tmp_path / "tree"
    old = [_write(lpsb, root, name, "y") for name in POOL[:5]]
    objs = [_write(lpsb, root, name, "y", ".obj") for name in POOL[5:8]]
    with open_session(tmp_path / "store") as session:
        first = sync(session, root, OPTIONS)
        assert first.orientation["formats"][".off"]["up"] == "y"
        before = {r.payload["path"]: r.payload for r in session.vectors.records("m3d_hog_mean")}
        added = [_write(lpsb, root, f"Table/{i}.off", "z") for i in range(141, 153) if f"Table/{i}.off" not in POOL]
        added += [_write(lpsb, root, name, "z") for name in ("Chair/104.off", "Chair/105.off")][:12 - len(added)]
        second = sync(session, root, OPTIONS)
        after = {r.payload["path"]: r.payload for r in session.vectors.records("m3d_hog_mean")}
    formats = second.orientation["formats"]
    assert formats[".off"]["up"] == "z" and "moved" in formats[".off"] and formats[".off"]["reoriented"] == 5
    assert (second.added, second.updated, second.orientation["reoriented"]) == (len(added), 5, 5)
    assert {after[p]["pose"]["up"] for p in old + added} == {"z"}
    assert all(after[p] == before[p] for p in objs)  # not re-embedded, not even re-stamped
    assert formats[".obj"] == {**formats[".obj"], "up": "y", "reoriented": 0}
    with open_session(tmp_path / "store") as session:  # cold: a new session reads the stored rules
        rules = collection_consensus(session, "m3d_hog_mean")
    assert (rules.rule_of(".off").up, rules.rule_of(".obj").up) == ("z", "y")


def test_a_cold_query_uses_the_stored_rules_and_old_stores_fall_back_to_the_points(lpsb, tmp_path):
    """The rules come from the collection's metadata, not from its points (garbled evidence in every
    payload changes nothing); a collection without them (an older store) is scanned, and the next sync
    stores them again. Same on the server code path."""
    root = tmp_path / "zup"
    for name in NAMES[:5]:
        _write(lpsb, root, name, "z")
    for url in (None, ":memory:"):
        with open_session(tmp_path / f"store-{url}", url=url) as session:
            sync(session, root, OPTIONS)
            assert set(session.vectors.metadata("m3d_hog_mean", UP_KEY)) == {"zup"}
            x_votes = {r.id: {"pose": {**r.payload["pose"], "evidence": [0.0, -9, -9, -9, -9, -9]}}
                       for r in session.vectors.records("m3d_hog_mean")}
            session.vectors.set_payload("m3d_hog_mean", x_votes)
            assert collection_consensus(session, "m3d_hog_mean").rule_of(".off").up == "z"
            hit = query(session, root / "Chair" / "101.off", collection="m3d_hog_mean", k=1).hits[0]
            assert hit.payload["path"] == "Chair/101.off" and hit.score == pytest.approx(1.0, abs=1e-4)
            session.vectors.set_metadata("m3d_hog_mean", UP_KEY, None)  # a store from before stored rules
            assert collection_consensus(session, "m3d_hog_mean").rule_of(".off").up == "x"  # the points' votes
            sync(session, root, OPTIONS)
            assert collection_consensus(session, "m3d_hog_mean").rule_of(".off").up == "z"


def test_a_resync_that_changes_nothing_rewrites_no_rules(lpsb, tmp_path):
    root = tmp_path / "tree"
    for name in NAMES[:3]:
        _write(lpsb, root, name, "y")
    with open_session(tmp_path / "store") as session:
        sync(session, root, OPTIONS)
        meta = tmp_path / "store" / "qdrant" / "m3d_hog_mean" / "m3d.json"
        before = meta.stat().st_mtime_ns, meta.read_text()
        again = sync(session, root, OPTIONS)
        assert again.unchanged == 3 and (meta.stat().st_mtime_ns, meta.read_text()) == before


def test_a_rebuild_carries_its_rules_to_the_new_version(lpsb, tmp_path):
    """--rebuild fills a new version of each collection; its rules are stored with it and a query then
    reads them through the name (the alias the rebuild published)."""
    from dataclasses import replace as with_

    root = tmp_path / "zup"
    for name in NAMES[:3]:
        _write(lpsb, root, name, "z")
    with open_session(tmp_path / "store") as session:
        sync(session, root, OPTIONS)
        sync(session, root, with_(OPTIONS, view=ViewSettings(views=3, size=96), rebuild=True))
        assert session.vectors.physical("m3d_hog_mean") != "m3d_hog_mean"  # read through the new version
        assert collection_consensus(session, "m3d_hog_mean").rule_of(".off").up == "z"
        assert set(session.vectors.metadata("m3d_hog_mean", UP_KEY)) == {"zup"}
