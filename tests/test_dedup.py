"""m3d dedup and eval --exclude-duplicates on real LPSB meshes and real stores (HOG mean collections).

Planted copies of every kind (tests/helpers.PLANTS: a byte copy, a format conversion, a turned and
scaled copy, a re-ordered one, a subdivided one, a decimated one, a jittered one) across train and
test, and hard negatives that must not pair: different LPSB objects of one class that look alike
(Mech/321, 322, 323: one part with and without a bevel or a hole; Chair/104 and 105)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import make_tree, needs_open3d, plant_copy
from test_report import CHROMIUM, _chromium_dom
from m3d import cli
from m3d.cli import app
from m3d.dedup import DEFAULT_CANDIDATES, DEFAULT_NEAR, SAME_FRACTION, DedupOptions, find_duplicates
from m3d.errors import UsageError
from m3d.evaluate import evaluate
from m3d.geometry import SAMPLES
from m3d.pipeline import SyncOptions, sync
from m3d.render import ViewSettings
from m3d.store import open_session

HOG = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=ViewSettings(up="y"))  # as measured
TURNED_SEED = 3
#: planted test file -> (train original, kind it must get)
PLANTED = {"Chair/test/copy_of_101.off": ("Chair/train/101.off", "exact"),
           "Cup/test/21.obj": ("Cup/train/21.off", "same-geometry"),
           "Airplane/test/62_turned.off": ("Airplane/train/62.off", "same-geometry"),
           "Mech/test/322_reordered.off": ("Mech/train/322.off", "same-geometry"),
           "Airplane/test/63_subdivided.off": ("Airplane/train/63.off", "same-geometry"),
           "Cup/test/23_decimated.off": ("Cup/train/23.off", None),  # same-geometry or near: the surface moves a little
           "Chair/test/102_jittered.off": ("Chair/train/102.off", "near")}
HARD_NEGATIVES = {("Mech/train/321.off", "Mech/train/322.off"), ("Mech/train/322.off", "Mech/train/323.off"),
                  ("Chair/test/104.off", "Chair/test/105.off")}


@pytest.fixture(scope="module")
def planted(lpsb, tmp_path_factory) -> dict:
    """Chair/Cup/Airplane/Mech in train; test holds two more objects of Chair and the planted copies;
    a second dataset holds one more byte copy (of a Cup, filed as a Vase)."""
    root = tmp_path_factory.mktemp("dedup")
    tree = make_tree(lpsb, root / "mn", {"Chair": 3, "Cup": 3, "Airplane": 3})
    make_tree(lpsb, root / "mn", {"Mech": 3})
    make_tree(lpsb, root / "mn", {"Chair": 5}, split="test")
    for name in ("101", "102", "103"):
        (tree / "Chair/test" / f"{name}.off").unlink()  # test keeps 104 and 105 only
    shutil.copyfile(lpsb / "Chair/101.off", tree / "Chair/test/copy_of_101.off")
    plant_copy(lpsb / "Cup/21.off", tree / "Cup/test/21", "obj")
    plant_copy(lpsb / "Airplane/62.off", tree / "Airplane/test/62_turned", "rotate-scale", seed=TURNED_SEED)
    plant_copy(lpsb / "Mech/322.off", tree / "Mech/test/322_reordered", "reorder")
    plant_copy(lpsb / "Airplane/63.off", tree / "Airplane/test/63_subdivided", "subdivide")
    plant_copy(lpsb / "Cup/23.off", tree / "Cup/test/23_decimated", "decimate-50")
    plant_copy(lpsb / "Chair/102.off", tree / "Chair/test/102_jittered", "jitter-1e-3")
    other = root / "other"
    (other / "Vase").mkdir(parents=True)
    shutil.copyfile(lpsb / "Cup/22.off", other / "Vase" / "not_a_vase.off")
    store = root / "store"
    with open_session(store) as session:
        sync(session, tree, HOG)
        sync(session, other, HOG)
        result = find_duplicates(session, DedupOptions(candidates=8))
    return {"tree": tree, "store": store, "result": result}


def _pairs(result) -> dict[tuple[str, str], object]:
    return {tuple(sorted((a.path, b.path))): p for a, b, p in result.pairs()}


def test_defaults_agree_with_the_cli() -> None:
    assert (cli.DEFAULT_DEDUP_NEAR, cli.DEFAULT_DEDUP_CANDIDATES, cli.DEDUP_SAMPLES) == (DEFAULT_NEAR, DEFAULT_CANDIDATES,
                                                                                          SAMPLES)


@needs_open3d
def test_every_planted_copy_pairs_with_its_kind_and_nothing_else_does(planted) -> None:
    result = planted["result"]
    pairs = _pairs(result)
    expected = {tuple(sorted((copy, orig))): kind for copy, (orig, kind) in PLANTED.items()}
    cup22 = ("Cup/train/22.off", "Vase/not_a_vase.off")  # across datasets and classes
    assert set(pairs) == set(expected) | {cup22}, set(pairs) ^ (set(expected) | {cup22})
    for key, kind in expected.items():
        assert pairs[key].kind == (kind or pairs[key].kind), (key, pairs[key].kind)
    assert pairs[tuple(sorted(("Cup/test/23_decimated.off", "Cup/train/23.off")))].kind in ("same-geometry", "near")
    assert pairs[cup22].kind == "exact"
    for key, p in pairs.items():
        if p.kind == "same-geometry":
            assert p.match.hausdorff <= SAME_FRACTION * p.match.spacing
        elif p.kind == "near":
            assert SAME_FRACTION * p.match.spacing < p.match.hausdorff <= DEFAULT_NEAR
    # the hard negatives were proposed (the vectors could not tell them apart) and geometry refused them
    checked = {tuple(sorted((c.a, c.b))): c for c in result.checked}
    for key in HARD_NEGATIVES:
        assert key in checked and checked[key].kind is None and checked[key].hausdorff > 2 * DEFAULT_NEAR, key
    # contamination: each planted test copy of a train object, nothing else
    assert result.test_objects == 2 + len(PLANTED)
    assert len(result.contaminated) == len(PLANTED)


@needs_open3d
def test_the_turned_copy_reports_the_rotation_that_was_planted(planted) -> None:
    from scipy.spatial.transform import Rotation

    planted_rotation = Rotation.random(random_state=np.random.default_rng(TURNED_SEED)).as_matrix()
    group = next(g for g in planted["result"].groups if any(m.path == "Airplane/test/62_turned.off" for m in g.members))
    (p,) = group.pairs
    first = group.members[p.a].path
    # the rotation takes the second member onto the first: the copy onto the original is the planted one undone
    want = planted_rotation.T if first == "Airplane/train/62.off" else planted_rotation
    assert np.allclose(p.match.rotation, want, atol=1e-4)
    assert p.match.hausdorff < 0.1 * SAME_FRACTION * p.match.spacing  # float32 rounding: far under the bound


@needs_open3d
def test_dedup_cli_json_report_and_nothing_is_touched(planted, tmp_path) -> None:
    before = {p: p.stat().st_mtime_ns for p in planted["tree"].rglob("*")}
    out = CliRunner().invoke(app, ["dedup", "--json", "--candidates", "8", "--report", str(tmp_path / "rep"),
                                   "--store", str(planted["store"])])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["contaminated_test_objects"] == len(PLANTED) and data["confirmed_pairs"] == len(PLANTED) + 1
    turned = next(p for g in data["groups"] for p in g["pairs"] if "62_turned" in p["a"] + p["b"])
    assert turned["kind"] == "same-geometry" and turned["why"].startswith("same-geometry: after turning")
    assert {"hausdorff", "chamfer", "rotation", "angle_degrees", "cosine", "proposed_by"} <= set(turned)
    assert data["cost"]["meshes_loaded"] <= data["objects"]  # once per object, not per pair
    for name in ("index.html", "checked_pairs.png", "dedup_pairs.csv", "dedup.json", "group_001.png"):
        assert (tmp_path / "rep" / name).is_file(), name
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "62_turned.off" in page and "never deletes or moves" in page and "Proposed, not duplicates" in page
    assert len((tmp_path / "rep" / "dedup_pairs.csv").read_text().splitlines()) == 1 + len(PLANTED) + 1
    assert {p: p.stat().st_mtime_ns for p in planted["tree"].rglob("*")} == before  # read-only


@needs_open3d
def test_old_cosine_options_say_what_to_use(planted) -> None:
    for args in (["dedup", "--threshold", "0.999"], ["eval", "--exclude-duplicates", "0.999"], ["dedup", "--near", "2"]):
        bad = CliRunner().invoke(app, [*args, "--store", str(planted["store"])])
        assert bad.exit_code == 2 and bad.output.count("\n") == 1, bad.output
    assert "--near" in CliRunner().invoke(app, ["dedup", "--threshold", "0.9", "--store", str(planted["store"])]).output
    with pytest.raises(UsageError):
        DedupOptions(candidates=0)  # nothing would be proposed


@needs_open3d
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no chromium at /usr/bin/chromium (apt-get install chromium)")
def test_report_page_shows_every_group(planted, tmp_path) -> None:
    """The page in a headless browser: every picture loads (data-images set by the page's script)."""
    with open_session(planted["store"]) as session:
        from m3d.dedup_report import write_dedup_report

        page = write_dedup_report(session, planted["result"], tmp_path / "rep")
    dom = _chromium_dom(page, tmp_path / "profile")
    n = 1 + len(planted["result"].groups)
    assert f'data-images="{n}/{n}"' in dom  # the scatter and one picture per group


@needs_open3d
def test_eval_excluding_duplicates_ranks_without_each_querys_confirmed_copies(planted) -> None:
    """The deduplicated NN accuracy is, query by query, whether the best candidate outside the query's
    confirmed group shares its class (brute force); the plain figures stay beside it."""
    with open_session(planted["store"]) as session:
        plain = evaluate(session, ["m3d_hog_mean"])[0]
        both = evaluate(session, ["m3d_hog_mean"], exclude_duplicates=True)[0]
        with pytest.raises(UsageError, match="not a cosine"):
            evaluate(session, ["m3d_hog_mean"], exclude_duplicates=0.999)  # the library refuses the old form too
        index = session.exact("m3d_hog_mean")
        labels = {r.id: r.payload["class"] for r in session.vectors.records("m3d_hog_mean", fields=["class"])}
        groups = find_duplicates(session, DedupOptions()).groups
    assert both.nn_accuracy == plain.nn_accuracy and both.map == plain.map
    group_of = {m.id: n for n, g in enumerate(groups) for m in g.members}
    y = np.array([labels[i] for i in index.ids])
    sims = index.vectors @ index.vectors.T
    hits = []
    for q, qid in enumerate(index.ids):
        if (y == y[q]).sum() < 2:
            continue  # a lone class (the Vase) is left out of every metric
        same = [r for r, pid in enumerate(index.ids) if qid in group_of and group_of.get(pid) == group_of[qid]]
        sims[q, [q, *same]] = -np.inf
        hits.append(y[int(np.argmax(sims[q]))] == y[q])
    d = both.deduplicated
    assert d["nn_acc"] == pytest.approx(np.mean(hits)) and d["nn_acc"] != plain.nn_accuracy
    assert d["pairs"] == sum(len(g.members) * (len(g.members) - 1) // 2 for g in groups) > 0
    row = both.row()
    assert row["dup_pairs"] == d["pairs"] and "dedup_p@5" in row and "dedup_map" in row


@needs_open3d
def test_lpsb_own_copy_pairs_and_its_look_alikes_do_not(lpsb, tmp_path) -> None:
    """LPSB itself holds copies: Mech/331 and Mech/339 are one mesh with its vertices re-ordered. Mech/321
    and Mech/330 (a bevel apart) and Chair/104 and 105 are different objects that the vectors put close."""
    tree = tmp_path / "lpsb"
    for name in ("Mech/331", "Mech/339", "Mech/321", "Mech/330", "Chair/104", "Chair/105"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / f"{name}.off").symlink_to(lpsb / f"{name}.off")
    with open_session(tmp_path / "store") as session:
        sync(session, tree, HOG)
        result = find_duplicates(session, DedupOptions())
    assert {k: p.kind for k, p in _pairs(result).items()} == {("Mech/331.off", "Mech/339.off"): "same-geometry"}
    assert {("Mech/321.off", "Mech/330.off"), ("Chair/104.off", "Chair/105.off")} <= {
        tuple(sorted((c.a, c.b))) for c in result.checked if c.kind is None}


def test_report_draws_hostile_names_as_typed(lpsb, tmp_path) -> None:
    """Class and file names are data on the report's pictures: `$\\bogus$` (mathtext that cannot parse)
    is drawn as typed, and the page escapes `<b>` instead of a traceback or markup."""
    tree = tmp_path / "tree"
    hostile = {"$\\bogus$": ("a$x^2$.off", "b.off"), "<b>x</b>": ("[bold]c.off", "d.off"), "=1+2": ("@e.off", "-f.off")}
    for folder, names in hostile.items():
        (tree / folder).mkdir(parents=True)
        for name in names:
            shutil.copyfile(lpsb / "Cup" / "21.off", tree / folder / name)
    with open_session(tmp_path / "store") as session:
        sync(session, tree, HOG)
    out = CliRunner().invoke(app, ["dedup", "--report", str(tmp_path / "rep"), "--store", str(tmp_path / "store")])
    assert out.exit_code == 0, out.output
    assert "$\\bogus$" in out.output  # the console table shows the name, not markup
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "&lt;b&gt;x&lt;/b&gt;/[bold]c.off" in page and "<b>x</b>" not in page
    assert (tmp_path / "rep" / "group_001.png").is_file()  # the six copies, one exact group
    cells = [cell for row in csv.reader(open(tmp_path / "rep" / "dedup_pairs.csv")) for cell in row]
    assert "'=1+2" in cells and "'=1+2/@e.off" in cells  # shown as text by a spreadsheet, never a formula
    assert not any(cell[:1] in "=+-@" for cell in cells if cell)
