"""Report figures and index.html from a real store: LPSB meshes synced with two weight-free HOG encoders,
figures re-rendered from the sources, and the page opened in headless Chromium."""

from __future__ import annotations

import re
from html import escape as html_escape
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m3d.cli import app
from m3d.errors import M3DError
from m3d.evaluate import evaluate
from m3d.report import (
    FIGURES,
    MISSING_GREY,
    QUERY,
    WRONG,
    class_styles,
    default_queries,
    gallery_rows,
    resolve_queries,
    tsne_embedding,
    tsne_perplexity,
    write_report,
)
from m3d.store import open_session

CLASSES = ("Airplane", "Chair", "Cup")
PER_CLASS = 4
ENCODERS = ("hog", "hog:ppc32-cpb2-o9-s128")  # two weight-free encoders, so "side by side" has two sides
POOLS = ("mean", "max")
CHROMIUM = Path("/usr/bin/chromium")


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def _pixels_near(path: Path, colour: np.ndarray, tol: int = 12) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(rgb - colour).max(axis=-1) <= tol).sum())


def _grey_tile_pixels(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return int((rgb == MISSING_GREY).all(axis=-1).sum())


@pytest.fixture(scope="module")
def tree(lpsb: Path, tmp_path_factory) -> Path:
    """3 classes x the 4 smallest LPSB meshes each, as symlinks (the data never gets copied)."""
    root = tmp_path_factory.mktemp("meshes") / "lpsbmini"
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for f in sorted((lpsb / label).glob("*.off"), key=lambda p: (p.stat().st_size, p.name))[:PER_CLASS]:
            (root / label / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def store(tree: Path, tmp_path_factory) -> Path:
    from m3d.pipeline import SyncOptions, sync

    store_dir = tmp_path_factory.mktemp("store")
    with open_session(store_dir) as session:
        report = sync(session, tree, SyncOptions(encoders=ENCODERS, pools=POOLS, workers=0))
    assert report.exit_status == 0, report.summary()
    return store_dir


@pytest.fixture(scope="module")
def gallery_paths(tree: Path) -> list[str]:
    return [f"Cup/{sorted((tree / 'Cup').iterdir())[-1].name}", f"Chair/{sorted((tree / 'Chair').iterdir())[0].name}"]


@pytest.fixture(scope="module")
def report_dir(store: Path, gallery_paths: list[str], tmp_path_factory) -> Path:
    """`m3d eval --report DIR --queries a,b` through the CLI, as a user runs it."""
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(app, ["eval", "--store", str(store), "--report", str(out),
                                      "--queries", ",".join(gallery_paths)])
    assert result.exit_code == 0, result.output
    assert str(out / "index.html") in result.output.replace("\n", "")
    return out


def _check_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert 300 <= w <= 4000 and 200 <= h <= 6000, (path.name, img.size)
        grey = np.asarray(img.convert("L"), dtype=float)
    assert grey.std() > 12, f"{path.name} looks blank (pixel std {grey.std():.1f})"
    return grey


def test_report_writes_every_figure_as_a_real_png(report_dir: Path) -> None:
    html = (report_dir / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(sources) == sorted(FIGURES)
    for name in sources:
        _check_png(report_dir / name)
    for name in ("eval.csv", "eval_per_class.csv", "eval.json"):
        assert (report_dir / name).stat().st_size > 0
        assert f'href="{name}"' in html


def test_neighbour_gallery_marks_wrong_classes_and_has_no_grey_tiles(report_dir: Path) -> None:
    """With 4 objects per class every query's top 5 holds at least 2 of another class: red frames must
    show; the two queries get blue frames; every source is present, so no grey tile."""
    path = report_dir / "neighbours.png"
    tile_frame = 4 * 200  # a 3 pt frame around a ~200 px tile is well over this many pixels
    assert _pixels_near(path, _rgb(WRONG)) > 2 * 2 * tile_frame
    assert _pixels_near(path, _rgb(QUERY)) > 2 * tile_frame
    assert _grey_tile_pixels(path) < 2000
    with Image.open(path) as img:
        assert img.size[1] < img.size[0]  # two query rows of six tiles: wider than tall


def test_index_html_holds_the_tables_and_how_to_read_each_figure(store: Path, report_dir: Path) -> None:
    html = (report_dir / "index.html").read_text()
    with open_session(store) as session:
        results = evaluate(session)
        names = session.collections()
    assert len(names) == len(ENCODERS) * len(POOLS)
    for r in results:
        assert r.collection in html
        assert f"<td>{r.row()['p@5']:.4f}</td>" in html
    for label in CLASSES:
        assert f'<td class="l">{label}</td>' in html
    for heading, caption in FIGURES.values():
        assert html_escape(caption) in html
    assert "mean little" in html  # the t-SNE warning
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained: nothing fetched from elsewhere


def _chromium_dom(page: Path, profile: Path) -> str:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                    "(apt-get install chromium) so index.html cannot be opened in a headless browser")
def test_every_image_loads_in_headless_chromium(report_dir: Path, tmp_path: Path) -> None:
    dom = _chromium_dom(report_dir / "index.html", tmp_path / "profile")
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load script did not run"
    assert loaded.groups() == (str(len(FIGURES)), str(len(FIGURES)))
    # The same page without its PNGs beside it must report the broken images (the check can fail).
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(report_dir / "index.html", alone / "index.html")
    dom = _chromium_dom(alone / "index.html", tmp_path / "profile2")
    assert re.search(r'data-images="(\d+)/(\d+)"', dom).groups() == ("0", str(len(FIGURES)))


def test_gallery_neighbours_are_the_exact_nearest_without_the_query(store: Path) -> None:
    with open_session(store) as session:
        name = session.collections()[0]
        index = session.exact(name)
        payloads = {r.id: r.payload for r in session.vectors.records(name)}
        queries = default_queries(payloads, 4)
        rows = gallery_rows(session, name, queries, k=5)
    assert [r.id for r in rows] == queries
    assert {payloads[q]["class"] for q in queries} == set(CLASSES)  # spread over every class
    assert [payloads[q]["class"] for q in default_queries(payloads, 2)] == ["Airplane", "Cup"]  # first and last
    for row in rows:
        qi = index.ids.index(row.id)
        sims = index.vectors @ index.vectors[qi]
        sims[qi] = -np.inf
        expected = np.sort(sims)[::-1][:5]
        assert row.id not in [n.id for n in row.neighbours]
        np.testing.assert_allclose([n.score for n in row.neighbours], expected, atol=1e-5)
        for n in row.neighbours:
            assert sims[index.ids.index(n.id)] == pytest.approx(n.score, abs=1e-5)
            assert n.correct == (payloads[n.id]["class"] == payloads[row.id]["class"])
        assert sum(n.correct is False for n in row.neighbours) >= 5 - (PER_CLASS - 1)


def test_unknown_gallery_query_is_a_one_line_error(store: Path) -> None:
    with open_session(store) as session:
        name = session.collections()[0]
        payloads = {r.id: r.payload for r in session.vectors.records(name)}
    some = next(iter(payloads.values()))["path"]
    assert resolve_queries(payloads, [some, "lpsbmini/" + some]) == [resolve_queries(payloads, [some])[0]] * 2
    with pytest.raises(M3DError, match="not a stored object") as err:
        resolve_queries(payloads, ["Chair/nope.off"])
    assert "\n" not in str(err.value)


def test_query_gallery_grey_tile_when_a_source_is_gone(store: Path, tree: Path, tmp_path: Path) -> None:
    """`m3d query --gallery` draws the query and its neighbours; a neighbour whose file is gone becomes a
    grey tile and the command still succeeds."""
    mesh = sorted((tree / "Chair").iterdir())[0]
    runner = CliRunner()
    full = tmp_path / "full.png"
    result = runner.invoke(app, ["query", str(mesh), "--store", str(store), "--gallery", str(full)])  # Qdrant
    assert result.exit_code == 0, result.output
    _check_png(full)
    assert _grey_tile_pixels(full) < 2000

    partial = tmp_path / "lpsbmini"  # the same dataset, with the query's own file (its top hit) missing
    shutil.copytree(tree, partial, symlinks=True)
    (partial / "Chair" / mesh.name).unlink()
    with open_session(store) as session:
        session.claim_root("lpsbmini", partial, explicit=True)
    try:
        gappy = tmp_path / "gappy.png"
        result = runner.invoke(app, ["query", str(mesh), "--store", str(store), "--exact", "--gallery", str(gappy)])
        assert result.exit_code == 0, result.output
        _check_png(gappy)
        assert _grey_tile_pixels(gappy) > 20000  # one ~200 x 200 px tile, minus its text
    finally:
        with open_session(store) as session:
            session.claim_root("lpsbmini", tree, explicit=True)


def test_report_survives_a_dataset_that_is_gone(store: Path, tree: Path, tmp_path: Path) -> None:
    """Every render unavailable: the report still writes every figure, grey tiles and a note say why."""
    with open_session(store) as session:
        session.claim_root("lpsbmini", tmp_path / "moved-away", explicit=True)
        try:
            results = evaluate(session, recall_queries=12)
            index = write_report(session, results, tmp_path / "report")
        finally:
            session.claim_root("lpsbmini", tree, explicit=True)
    for name in FIGURES:
        _check_png(index.parent / name)
    assert _grey_tile_pixels(index.parent / "neighbours.png") > 4 * 6 * 20000
    assert "source not available" in index.read_text()


def test_report_with_no_collections_still_writes_a_page(tmp_path: Path) -> None:
    with open_session(tmp_path / "empty-store") as session:
        index = write_report(session, [], tmp_path / "report")
    assert sorted(re.findall(r'<img src="([^"]+)"', index.read_text())) == sorted(FIGURES)
    for name in FIGURES:
        _check_png(index.parent / name)


def test_tsne_is_reproducible(store: Path) -> None:
    with open_session(store) as session:
        vectors = session.exact(session.collections()[0]).vectors
    first, perplexity = tsne_embedding(vectors)
    again, _ = tsne_embedding(vectors)
    assert first.shape == (len(vectors), 2) and perplexity == tsne_perplexity(len(vectors))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, tsne_embedding(vectors, seed=1)[0])


def test_tsne_perplexity_fits_the_collection() -> None:
    for n in (4, 5, 12, 40, 90, 1000, 12311):
        p = tsne_perplexity(n)
        assert 1 <= p < n
    assert tsne_perplexity(12) == pytest.approx(11 / 3)
    assert tsne_perplexity(12311) == 30.0


def test_class_styles_tell_40_classes_apart() -> None:
    classes = [f"class{i:02d}" for i in range(40)]
    styles = class_styles(classes)
    assert len({tuple(np.round(colour, 3)) for colour, _ in styles.values()}) == 40
    assert len({marker for _, marker in styles.values()}) == 4
    assert class_styles(classes) == styles  # deterministic
