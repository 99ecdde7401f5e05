"""The CLI as a user meets it: exit statuses, one-line errors, JSON output, and a busy store."""

import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from m3d.cli import app

from helpers import make_tree

runner = CliRunner()


@pytest.fixture(scope="module")
def synced(lpsb, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    tree = make_tree(lpsb, base / "meshes", {"Bird": 3, "Fish": 3})
    store = base / "store"
    result = runner.invoke(app, ["sync", str(tree), "--encoders", "hog", "--pools", "mean,max", "--workers", "0",
                                 "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    return tree, store, json.loads(result.stdout)


def test_sync_json_summary(synced):
    _, _, summary = synced
    assert summary["added"] == 6 and summary["skipped"] == 0 and summary["exit_status"] == 0
    assert summary["collections"] == ["m3d_hog_max", "m3d_hog_mean"]


def test_query_json_and_table(synced):
    tree, store, _ = synced
    mesh = str(tree / "Fish" / "train" / "221.off")
    out = runner.invoke(app, ["query", mesh, "--k", "3", "--store", str(store), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["collection"] == "m3d_hog_mean" and data["engine"] == "qdrant"
    assert data["hits"][0]["path"] == "Fish/train/221.off" and len(data["hits"]) == 3
    exact = json.loads(runner.invoke(app, ["query", mesh, "--k", "3", "--exact", "--store", str(store), "--json"]).stdout)
    assert [h["path"] for h in exact["hits"]] == [h["path"] for h in data["hits"]]
    birds = json.loads(runner.invoke(app, ["query", mesh, "--class", "Bird", "--collection", "m3d_hog_max",
                                           "--store", str(store), "--json"]).stdout)
    assert {h["class"] for h in birds["hits"]} == {"Bird"}
    table = runner.invoke(app, ["query", mesh, "--store", str(store)])
    assert "Fish/train/221.off" in table.stdout


def test_bad_query_mesh_is_one_line_exit_2(synced, tmp_path):
    _, store, _ = synced
    bad = tmp_path / "broken.off"
    bad.write_text("OFF\n10 10 0\n1 2 3\n")
    out = runner.invoke(app, ["query", str(bad), "--store", str(store)])
    assert out.exit_code == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and "broken.off" in out.stderr
    missing = runner.invoke(app, ["query", str(tmp_path / "nope.off"), "--store", str(store)])
    assert missing.exit_code == 2 and "nope.off" in missing.stderr


def test_info_check_eval_render(synced, tmp_path):
    tree, store, _ = synced
    info = json.loads(runner.invoke(app, ["info", "--store", str(store), "--json"]).stdout)
    assert [(c["collection"], c["points"], c["classes"]) for c in info["collections"]] == [
        ("m3d_hog_max", 6, 2), ("m3d_hog_mean", 6, 2)]
    table = runner.invoke(app, ["info", "--store", str(store)]).stdout  # a pipe: the wide table comes whole
    assert "…" not in table and "none (exact scan)" in table and "renderer" in table
    check = runner.invoke(app, ["check", "--store", str(store), "--json"])
    assert check.exit_code == 0 and all(row["in_step"] for row in json.loads(check.stdout))
    out_dir = tmp_path / "eval"
    ev = runner.invoke(app, ["eval", "--store", str(store), "--out", str(out_dir), "--json"])
    assert ev.exit_code == 0, ev.output
    rows = json.loads(ev.stdout)
    assert {r["collection"] for r in rows} == {"m3d_hog_max", "m3d_hog_mean"}
    assert (out_dir / "eval.csv").read_text().splitlines()[0].startswith(
        "collection,objects,classes,p@5,p@10,map,nn_acc,ft,st,dcg")
    assert all(0.0 <= r[key] <= 1.0 for r in rows for key in ("first_tier", "second_tier", "dcg"))
    strip = tmp_path / ("a-long-folder-name-" * 4) / "strip.png"  # the message is wider than 80 columns
    strip.parent.mkdir()
    rendered = runner.invoke(app, ["render", str(tree / "Bird" / "train" / "242.off"), "-o", str(strip), "--views", "4"])
    assert rendered.exit_code == 0, rendered.output
    assert Image.open(strip).size == (4 * 224, 224)
    assert f"wrote {strip} (4 views on a ring" in rendered.stdout  # one line: never cut mid-path


@pytest.mark.parametrize("args, message", [
    (["sync", "--bogus", "x"], "error: No such option: --bogus (options: m3d sync --help)"),
    (["query", "--k", "0", "x.off"], "error: Invalid value for '--k': Input should be greater than or equal to 1"),
])
def test_the_m3d_command_says_a_usage_error_in_one_line(args, message):
    """The console entry point (what `m3d` runs, not CliRunner): click's usage block is one line, exit 2."""
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'm3d'; from m3d.cli import run; run()", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines() == [out.stderr.strip()], out.stderr
    assert out.stderr.startswith(message)


def test_unknown_encoder_and_pool_are_clear(synced, tmp_path):
    tree, store, _ = synced
    for command in (["query", str(tree / "Bird" / "train" / "242.off")], ["eval"]):  # a typo is a usage error
        out = runner.invoke(app, [*command, "--store", str(store), "--collection", "m3d_hog_maen"])
        assert out.exit_code == 2 and "no collection 'm3d_hog_maen'" in out.stderr and "m3d_hog_mean" in out.stderr
    out = runner.invoke(app, ["sync", str(tree), "--encoders", "hog", "--pools", "median", "--store", str(tmp_path / "s")])
    assert out.exit_code != 0 and "median" in out.stderr and "mean" in out.stderr
    out = runner.invoke(app, ["sync", str(tmp_path / "missing"), "--encoders", "hog", "--store", str(tmp_path / "s")])
    assert out.exit_code == 2 and "not a directory" in out.stderr
    out = runner.invoke(app, ["sync", str(tree), "--encoders", "hog", "--renderer", "povray", "--store", str(tmp_path / "s")])
    assert out.exit_code == 2 and "povray" in out.stderr and "moderngl" in out.stderr
    out = runner.invoke(app, ["sync", str(tree), "--encoders", ",", "--store", str(tmp_path / "s")])
    assert out.exit_code == 2 and "no encoder" in out.stderr
    out = runner.invoke(app, ["sync", str(tree), "--encoders", "hog", "--split", "test", "--store", str(tmp_path / "s")])
    assert out.exit_code == 2 and "no mesh files" in out.stderr
    (tmp_path / "empty").mkdir()
    out = runner.invoke(app, ["sync", str(tmp_path / "empty"), "--encoders", "hog", "--store", str(tmp_path / "s")])
    assert out.exit_code == 2 and "no mesh files" in out.stderr
    out = runner.invoke(app, ["info", "--store", str(tmp_path / "typo")])
    assert out.exit_code == 1 and "no store at" in out.stderr and not (tmp_path / "typo").exists()
    out = runner.invoke(app, ["info", "--qdrant-url", "notaurl", "--store", str(tmp_path / "s")])
    assert out.exit_code == 2 and "not a Qdrant URL" in out.stderr


def test_faiss_repair(synced):
    _, store, _ = synced
    (store / "faiss" / "m3d_hog_max.faiss").unlink()
    broken = runner.invoke(app, ["check", "--store", str(store), "--json"])
    assert broken.exit_code == 1
    assert {r["collection"]: r["in_step"] for r in json.loads(broken.stdout)}["m3d_hog_max"] is False
    fixed = runner.invoke(app, ["check", "--repair", "--store", str(store), "--json"])
    assert fixed.exit_code == 0
    assert runner.invoke(app, ["check", "--store", str(store)]).exit_code == 0


def test_query_during_sync_says_busy(lpsb, tmp_path):
    tree = make_tree(lpsb, tmp_path / "meshes", {"Hand": 6})
    store = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sync = subprocess.Popen([sys.executable, "-m", "m3d.cli", "-v", "sync", str(tree), "--encoders", "hog",
                             "--workers", "0", "--store", str(store)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in sync.stderr:
            if "plan:" in line:
                break
        # Freeze the sync while it holds the store, so the query meets it mid-run however fast the sync is.
        os.kill(sync.pid, signal.SIGSTOP)
        query = subprocess.run([sys.executable, "-m", "m3d.cli", "query", str(tree / "Hand" / "train" / "181.off"),
                                "--store", str(store)], capture_output=True, text=True, env=env, timeout=60)
        assert query.returncode == 3
        assert "busy" in query.stderr and f"pid {sync.pid}" in query.stderr and query.stderr.count("\n") == 1
    finally:
        os.kill(sync.pid, signal.SIGCONT)
        sync.stderr.read()
        sync.wait(timeout=120)
    assert sync.returncode == 0


def test_a_directory_named_lock_says_how_to_fix_it(synced, tmp_path):
    import shutil

    _, store, _ = synced
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / "lock").unlink()
    (copy / "lock").mkdir()
    result = runner.invoke(app, ["info", "--store", str(copy)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "is a directory, not m3d's lock file: move it away" in result.stderr


def test_summary_counts_add_up_and_a_sync_with_nothing_to_do_names_no_bottleneck(lpsb, tmp_path):
    tree = make_tree(lpsb, tmp_path / "meshes", {"Cup": 2})
    (tree / "Cup" / "train" / "loop").symlink_to(tree / "Cup")  # a directory symlink loop: skipped, counted
    args = ["sync", str(tree), "--encoders", "hog", "--pools", "mean", "--workers", "0", "--store", str(tmp_path / "s")]
    first = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert first["skipped"] == 1 and first["discovered"] == first["added"] + first["updated"] + first["unchanged"] + 1
    again = runner.invoke(app, args)
    assert again.exit_code == 4 and "3 meshes: 0 added, 0 updated, 2 unchanged, 0 removed, 1 skipped" in again.stdout
    assert "bottleneck: none (nothing to embed)" in again.stdout, again.stdout


def test_info_shows_settings_as_given_and_long_names_keep_tables_narrow_in_a_pipe(lpsb, tmp_path):
    import shutil

    tree = tmp_path / "meshes"
    (tree / "Cup" / "train").mkdir(parents=True)
    long = "a" * 236 + ".off"
    shutil.copyfile(lpsb / "Cup" / "21.off", tree / "Cup" / "train" / long)
    shutil.copyfile(lpsb / "Cup" / "22.off", tree / "Cup" / "train" / "22.off")
    store = str(tmp_path / "s")
    assert runner.invoke(app, ["sync", str(tree), "--encoders", "hog", "--pools", "mean", "--workers", "0",
                               "--store", store]).exit_code == 0
    info = runner.invoke(app, ["info", "--store", store]).stdout
    assert "20.0000" not in info and " 20 " in info, info
    table = runner.invoke(app, ["query", str(tree / "Cup" / "train" / "22.off"), "--store", store]).stdout
    assert max(len(line) for line in table.splitlines()) <= 200, table
    assert long in "".join(line.strip("│ ") for line in table.splitlines()), table  # folded, never cut


def test_query_up_help_lists_auto():
    help_text = " ".join(runner.invoke(app, ["query", "--help"]).stdout.split())
    assert "-x, -y, -z, or auto" in help_text


def test_the_offline_advice_names_a_command_that_is_installed():
    from pathlib import Path

    from m3d.encoders.hub import offline_message

    assert "run `hf download facebook/dinov2-base`" in offline_message("facebook/dinov2-base")
    assert (Path(sys.executable).parent / "hf").exists()  # huggingface_hub >= 1 ships `hf`, not huggingface-cli
