"""m3d dedup and eval --exclude-duplicates on real LPSB meshes and real stores (HOG mean collections).

Planted copies: byte copies (exact, across folders, classes and datasets), re-saved copies (new bytes,
same shape: near), and a ModelNet-style train/test tree whose contamination count must equal the
number of test objects planted as copies of train objects."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import make_tree, perturbed_copy
from test_report import CHROMIUM, _chromium_dom
from m3d.cli import DEFAULT_DEDUP_THRESHOLD, app
from m3d.dedup import DEFAULT_THRESHOLD, DedupOptions, find_duplicates
from m3d.errors import UsageError
from m3d.evaluate import evaluate
from m3d.meshio import load_mesh
from m3d.pipeline import SyncOptions, sync
from m3d.render import ViewSettings
from m3d.store import open_session

HOG = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=ViewSettings(up="y"))  # as measured


@pytest.fixture(scope="module")
def planted(lpsb, tmp_path_factory) -> dict:
    """Chair/Cup/Airplane in train and test; 2 test objects are byte copies of train objects, 1 a
    re-saved copy; a second dataset holds one more byte copy (of a Cup, filed as a Vase)."""
    root = tmp_path_factory.mktemp("dedup")
    tree = make_tree(lpsb, root / "mn", {"Chair": 3, "Cup": 3, "Airplane": 3}, copy=True)
    for label, ids in {"Chair": (104, 106), "Cup": (24, 25), "Airplane": (64, 65)}.items():
        (tree / label / "test").mkdir()
        for i in ids:
            shutil.copyfile(lpsb / label / f"{i}.off", tree / label / "test" / f"{i}.off")
    shutil.copyfile(tree / "Chair/train/101.off", tree / "Chair/test/copy_of_101.off")
    shutil.copyfile(tree / "Cup/train/21.off", tree / "Cup/test/copy_of_21.off")
    perturbed_copy(tree / "Airplane/train/62.off", tree / "Airplane/test/resaved_62.off")
    other = root / "other"
    (other / "Vase").mkdir(parents=True)
    shutil.copyfile(tree / "Cup/train/22.off", other / "Vase" / "not_a_vase.off")
    store = root / "store"
    with open_session(store) as session:
        sync(session, tree, HOG)
        sync(session, other, HOG)
    return {"tree": tree, "store": store}


def test_byte_copies_are_exact_resaved_copies_near_and_contamination_is_what_was_planted(planted) -> None:
    assert DEFAULT_DEDUP_THRESHOLD == DEFAULT_THRESHOLD  # the CLI's copy of the default cannot drift
    with open_session(planted["store"]) as session:
        result = find_duplicates(session, DedupOptions())
    exact = {tuple(sorted((m.dataset, m.path) for m in g.members)) for g in result.exact}
    assert exact == {(("mn", "Chair/test/copy_of_101.off"), ("mn", "Chair/train/101.off")),
                     (("mn", "Cup/test/copy_of_21.off"), ("mn", "Cup/train/21.off")),
                     (("mn", "Cup/train/22.off"), ("other", "Vase/not_a_vase.off"))}  # across datasets and classes
    assert ["mn:Cup/train/22.off", "other:Vase/not_a_vase.off"] in [g.places for g in result.exact]
    assert ["Chair/test/copy_of_101.off", "Chair/train/101.off"] in [g.places for g in result.exact]
    near = [sorted(m.path for m in g.members) for g in result.near]
    assert near == [["Airplane/test/resaved_62.off", "Airplane/train/62.off"]]
    assert result.near[0].min_score >= DEFAULT_THRESHOLD
    assert result.objects == 19 and result.test_objects == 9
    assert len(result.contaminated) == 3  # the three planted test copies, nothing else
    assert result.per_class == {"Airplane": {"test": 3, "contaminated": 1}, "Chair": {"test": 3, "contaminated": 1},
                                "Cup": {"test": 3, "contaminated": 1}}
    assert len(result.nn_similarity) == 19 and max(result.nn_similarity) == pytest.approx(1.0, abs=1e-5)


def test_dedup_cli_json_report_and_nothing_is_touched(planted, tmp_path) -> None:
    before = {p: p.stat().st_mtime_ns for p in planted["tree"].rglob("*")}
    out = CliRunner().invoke(app, ["dedup", "--json", "--report", str(tmp_path / "rep"), "--store", str(planted["store"])])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert (data["exact_groups"], data["near_groups"], data["contaminated_test_objects"]) == (3, 1, 3)
    for name in ("index.html", "nn_similarity.png", "dedup_pairs.csv", "dedup.json", "group_001.png", "group_004.png"):
        assert (tmp_path / "rep" / name).is_file(), name
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "resaved_62.off" in page and "never deletes or moves" in page
    assert len((tmp_path / "rep" / "dedup_pairs.csv").read_text().splitlines()) == 1 + 4
    assert {p: p.stat().st_mtime_ns for p in planted["tree"].rglob("*")} == before  # read-only
    bad = CliRunner().invoke(app, ["dedup", "--threshold", "1.5", "--store", str(planted["store"])])
    assert bad.exit_code == 2 and "threshold" in bad.output and bad.output.count("\n") == 1
    with pytest.raises(UsageError):
        DedupOptions(threshold=0.0)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no chromium at /usr/bin/chromium (apt-get install chromium)")
def test_report_page_shows_every_group(planted, tmp_path) -> None:
    """The page in a headless browser: every picture loads (data-images set by the page's script)."""
    CliRunner().invoke(app, ["dedup", "--report", str(tmp_path / "rep"), "--store", str(planted["store"])])
    dom = _chromium_dom(tmp_path / "rep" / "index.html", tmp_path / "profile")
    assert 'data-images="5/5"' in dom  # the histogram and four group pictures


def _same_shape(a: Path, b: Path) -> bool:
    """Same geometry up to vertex order and a rotation about the centre: equal sorted vertex radii."""
    va, vb = load_mesh(a).vertices, load_mesh(b).vertices
    return len(va) == len(vb) and np.allclose(np.sort(np.linalg.norm(va, axis=1)), np.sort(np.linalg.norm(vb, axis=1)),
                                              atol=1e-4)


def test_default_threshold_pairs_only_same_geometry_on_lpsb(lpsb, tmp_path) -> None:
    """LPSB itself holds copies (Mech/331 and Mech/339 are one mesh with its vertices re-ordered);
    at the default threshold every pair found is such a copy, and different meshes of one class
    that look alike (Mech/321 vs Mech/330, a chamfer apart; Chair/104 vs Chair/105) are not paired."""
    tree = make_tree(lpsb, tmp_path / "lpsb", {"Mech": 20, "Chair": 20}, split=None)
    with open_session(tmp_path / "store") as session:
        sync(session, tree, HOG)
        result = find_duplicates(session, DedupOptions())
        pairs = {tuple(sorted((g.members[i].path, g.members[j].path))) for g in result.exact + result.near
                 for i, j, _ in g.pairs}
    assert ("Mech/331.off", "Mech/339.off") in pairs
    assert all(_same_shape(tree / a, tree / b) for a, b in pairs), pairs
    assert not pairs & {("Mech/321.off", "Mech/330.off"), ("Chair/104.off", "Chair/105.off")}


def test_eval_excluding_duplicates_ranks_without_each_querys_copies(planted) -> None:
    """The deduplicated NN accuracy is, query by query, whether the best candidate scoring below the
    threshold shares the query's class (checked by brute force); the plain figures stay beside it."""
    with open_session(planted["store"]) as session:
        plain = evaluate(session, ["m3d_hog_mean"])[0]
        both = evaluate(session, ["m3d_hog_mean"], exclude_duplicates=DEFAULT_THRESHOLD)[0]
        with pytest.raises(UsageError, match="threshold must be a cosine"):
            evaluate(session, ["m3d_hog_mean"], exclude_duplicates=1.5)  # the library refuses it, not only the CLI
        index = session.exact("m3d_hog_mean")
        labels = {r.id: r.payload["class"] for r in session.vectors.records("m3d_hog_mean", fields=["class"])}
    assert both.nn_accuracy == plain.nn_accuracy and both.map == plain.map
    y = np.array([labels[i] for i in index.ids])
    sims = index.vectors @ index.vectors.T
    hits = []
    for q in range(len(y)):
        if (y == y[q]).sum() < 2:
            continue  # a lone class (the Vase) is left out of every metric
        sims[q, q] = -np.inf
        candidates = np.where(sims[q] < DEFAULT_THRESHOLD, sims[q], -np.inf)
        hits.append(y[int(np.argmax(candidates))] == y[q])
    d = both.deduplicated
    assert d["nn_acc"] == pytest.approx(np.mean(hits)) and d["nn_acc"] != plain.nn_accuracy
    assert d["pairs"] == 4 and d["threshold"] == DEFAULT_THRESHOLD
    row = both.row()
    assert row["dup_pairs"] == 4 and "dedup_p@5" in row and "dedup_map" in row


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
