"""File and class names are data wherever they are shown: names with table markup, terminal escape
sequences, matplotlib mathtext or bytes that are not UTF-8 go through sync, every table and the
HTML report as typed (or as a visible escape), and never stop a command."""

import json
import os

import pytest
from typer.testing import CliRunner

from m3d.cli import app

from helpers import make_tree

runner = CliRunner()
SYNC = ["--encoders", "hog", "--pools", "mean", "--workers", "0"]
MARKUP = "x[/bold].off"  # class folder `x[`, file `bold].off`: markup closing a tag never opened
ESCAPE = "esc\x1b[31mred.off"
MATH = "$\\bogus$"


def _no_traceback(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@pytest.fixture(scope="module")
def synced(lpsb, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "meshes"
    meshes = sorted((lpsb / "Cup").glob("*.off"), key=lambda p: int(p.stem))
    for folder in ("Cup", "x[", MATH):
        (root / folder).mkdir(parents=True)
    for src, dest in zip(meshes, [root / MARKUP, root / "x[" / "[red]b.off", root / "Cup" / ESCAPE,
                                  root / "Cup" / "plain.off", root / MATH / "a.off", root / MATH / f"{MATH}.off"]):
        dest.symlink_to(src)
    store = root.parent / "store"
    result = runner.invoke(app, ["sync", str(root), *SYNC, "--store", str(store)])
    _no_traceback(result)
    return root, str(store), result


def test_a_name_that_is_not_utf8_is_skipped_with_a_reason(lpsb, tmp_path):
    tree = make_tree(lpsb, tmp_path / "meshes", {"Cup": 2})
    os.symlink(lpsb / "Cup" / "25.off", os.fsencode(tree / "Cup" / "train") + b"/bad\xff.off")
    result = runner.invoke(app, ["sync", str(tree), *SYNC, "--store", str(tmp_path / "store")])
    _no_traceback(result)
    assert result.exit_code == 4, result.output  # the others are stored, the undecodable name is listed
    assert "2 added" in result.stdout and "Cup/train/bad\\xff.off: file name is not valid UTF-8" in result.stdout
    report = json.loads((tmp_path / "store" / "reports" / "last-sync.json").read_text())
    assert [s["rel_path"] for s in report["skipped"]] == ["Cup/train/bad\\xff.off"]


def test_markup_and_escapes_in_names_are_shown_in_every_table(synced):
    tree, store, sync = synced
    assert sync.exit_code == 0, sync.output
    assert "6 meshes: 6 added" in sync.stdout
    query = runner.invoke(app, ["query", str(tree / MARKUP), "--k", "6", "--store", store])
    _no_traceback(query)
    assert query.exit_code == 0, query.output
    assert MARKUP in query.stdout and "x[/[red]b.off" in query.stdout and MATH in query.stdout
    assert "Cup/esc\\x1b[31mred.off" in query.stdout and "\x1b" not in query.stdout  # visible, never obeyed
    filtered = runner.invoke(app, ["query", str(tree / MARKUP), "--class", MATH, "--json", "--store", store])
    assert {h["class"] for h in json.loads(filtered.stdout)["hits"]} == {MATH}
    for args in (["info"], ["check"]):
        shown = runner.invoke(app, [*args, "--store", store])
        _no_traceback(shown)
        assert shown.exit_code == 0 and "\x1b" not in shown.stdout, shown.output


def test_mathtext_in_names_does_not_break_the_report(synced, tmp_path):
    tree, store, _ = synced
    out = tmp_path / "report"
    evaluated = runner.invoke(app, ["eval", "--report", str(out), "--out", str(tmp_path / "eval"), "--store", store,
                                    "--queries", f"{MATH}/{MATH}.off"])
    _no_traceback(evaluated)
    assert evaluated.exit_code == 0, evaluated.output
    assert MATH in (out / "index.html").read_text()


def test_the_escape_byte_of_a_name_never_reaches_the_dedup_html(lpsb, tmp_path):
    """The same mesh under a name holding ESC and under a plain one: an exact-duplicate group whose
    page shows the name as the tables do (a visible \\x1b); the CSV keeps the name as data."""
    root = tmp_path / "meshes" / "Cup"
    root.mkdir(parents=True)
    for name in (ESCAPE, "plain.off", "other.off"):
        (root / name).symlink_to(lpsb / "Cup" / ("21.off" if name != "other.off" else "22.off"))
    store = str(tmp_path / "store")
    assert runner.invoke(app, ["sync", str(tmp_path / "meshes"), *SYNC, "--store", store]).exit_code == 0
    out = tmp_path / "dedup"
    done = runner.invoke(app, ["dedup", "--report", str(out), "--store", store])
    _no_traceback(done)
    assert done.exit_code == 0, done.output
    page = (out / "index.html").read_text()
    assert "\x1b" not in page and "esc\\x1b[31mred.off" in page
    assert any(ESCAPE in p.read_text() for p in out.glob("*.csv"))
