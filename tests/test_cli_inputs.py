"""Bad input as users type it: option values out of range, odd paths for --store, samples or --k,
names with commas, a class that does not exist, a busy store. Each is one line with the right exit
status, leaves no store folder or lock file behind, and never a traceback."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from m3d.cli import app
from m3d.errors import MeshError, UsageError
from m3d.meshio import load_mesh
from m3d.pipeline import SyncOptions, sync
from m3d.store import open_session

from helpers import make_tree

runner = CliRunner()
SYNC = ["--encoders", "hog", "--pools", "mean", "--workers", "0"]


def _one_line(result, code):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not set(line) <= set("─╭╮╰╯│ ")]
    assert lines, result.output
    return result.stderr


@pytest.fixture(scope="module")
def synced(lpsb, tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    tree = make_tree(lpsb, base / "meshes", {"Cup": 2})
    make_tree(lpsb, tree, {"Chair": 2})
    (tree / "Chair").rename(tree / "Chair, wooden")  # a class whose name holds a comma
    store = base / "store"
    assert runner.invoke(app, ["sync", str(tree), *SYNC, "--store", str(store)]).exit_code == 0
    return tree, store


@pytest.mark.parametrize("option", [["--size", "100000"], ["--elevation", "1000"], ["--device", "foo"],
                                    ["--pools", "avg"], ["--precision", "fp8"]])
def test_bad_option_values_exit_2_and_leave_no_store(synced, tmp_path, option):
    tree, _ = synced
    store = tmp_path / "new-store"
    out = runner.invoke(app, ["sync", str(tree), *SYNC, *option, "--store", str(store)])
    _one_line(out, 2)
    assert not store.exists()


def test_an_unknown_encoder_leaves_no_store_folder(synced, tmp_path):
    tree, _ = synced
    out = runner.invoke(app, ["sync", str(tree), "--encoders", "/no/such/checkpoint", "--workers", "0",
                              "--store", str(tmp_path / "s")])
    assert out.exit_code != 0 and out.stderr.startswith("error: ")
    assert not (tmp_path / "s").exists()


def test_odd_paths_and_numbers_are_one_line(synced, tmp_path):
    tree, store = synced
    mesh = str(tree / "Cup" / "train" / "21.off")
    _one_line(runner.invoke(app, ["query", mesh, "--k", "99999999999999999999", "--store", str(store)]), 2)
    assert "/dev/null/x" in _one_line(runner.invoke(app, ["samples", "/dev/null/x"]), 1)
    afile = tmp_path / "afile"
    afile.write_text("not a store")
    assert "is a file" in _one_line(runner.invoke(app, ["sync", str(tree), *SYNC, "--store", str(afile)]), 2)
    assert "no store at /proc/self" in _one_line(runner.invoke(app, ["info", "--store", "/proc/self"]), 1)
    _one_line(runner.invoke(app, ["info", "--store", ""]), 2)
    _one_line(runner.invoke(app, ["sync", str(tree), *SYNC, "--store", ""]), 2)
    plain = tmp_path / "plain-folder"
    plain.mkdir()
    for command in (["info"], ["check"], ["query", mesh], ["eval"]):
        _one_line(runner.invoke(app, [*command, "--store", str(plain)]), 1)
    assert list(plain.iterdir()) == []  # no lock file left in a folder that is not a store


def test_classes_with_commas_and_unknown_classes(synced, tmp_path):
    tree, store = synced
    picked = runner.invoke(app, ["sync", str(tree), *SYNC, "--classes", '"Chair, wooden"', "--json",
                                 "--store", str(tmp_path / "s")])
    assert picked.exit_code == 0, picked.output
    assert '"added": 2' in picked.stdout
    nope = runner.invoke(app, ["query", str(tree / "Cup" / "train" / "21.off"), "--class", "Nope",
                               "--store", str(store)])
    assert "no class 'Nope'" in _one_line(nope, 2) and "Cup" in nope.stderr


def test_sync_options_validate_themselves(synced, tmp_path):
    tree, _ = synced
    with pytest.raises(UsageError, match="avg"):
        SyncOptions(encoders=("hog",), pools=("avg",))
    with pytest.raises(UsageError, match="batch_size"):
        SyncOptions(encoders=("hog",), batch_size=0)
    with open_session(tmp_path / "store") as session:
        with pytest.raises(UsageError):
            sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean", "avg")))
        assert session.collections() == []


def test_skip_reasons_say_what_is_wrong(tmp_path):
    zero = tmp_path / "zero.obj"
    zero.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n")
    huge = tmp_path / "huge.ply"
    huge.write_text("ply\nformat ascii 1.0\nelement vertex 4000000000\nproperty float x\nproperty float y\n"
                    "property float z\nelement face 1\nproperty list uchar int vertex_indices\nend_header\n"
                    "0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    lying = tmp_path / "lying.stl"
    triangle = (b"\0" * 12 + b"\0" * 12 + b"\0\0\x80?" + b"\0" * 8 + b"\0" * 4 + b"\0\0\x80?" + b"\0" * 4 + b"\0\0")
    lying.write_bytes(b"\0" * 80 + (1000).to_bytes(4, "little") + triangle * 2)
    for path, reason in ((zero, "index 0"), (huge, "4000000000 vertices"), (lying, "says 1000 faces")):
        with pytest.raises(MeshError, match=reason):
            load_mesh(path)


def test_a_second_sync_says_busy_before_loading_anything(synced, tmp_path):
    tree, _ = synced
    store = tmp_path / "busy"
    script = textwrap.dedent(f"""
        import sys
        from m3d.cli import app
        try:
            app(["-v", "sync", {str(tree)!r}, "--encoders", "hog", "--store", {str(store)!r}])
        except SystemExit as exc:
            print(exc.code, "torch" in sys.modules)
    """)
    with open_session(store):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds = time.monotonic() - started
    assert done.stdout.split() == ["3", "False"], (done.stdout, done.stderr)  # busy, and torch never imported
    assert f"pid {os.getpid()}" in done.stderr and done.stderr.count("\n") == 1
    print(f"busy answered in {seconds:.2f} s")  # measured, not asserted
