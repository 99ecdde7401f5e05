"""Fuzz load_mesh: generated OFF/OBJ texts, valid and mutated.

The contract under test: load_mesh returns a valid normalised Mesh or raises MeshError, never any
other exception; and a valid generated OFF parses to exactly the mesh that was written.
Derandomised (same cases every run) so CI cannot flake; per-case times are printed with -s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3d.errors import MeshError
from m3d.meshio import Mesh, load_mesh

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CASE_SECONDS: dict[str, list[float]] = {}

COORD = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False)
FORMATS = ("{!r}", "{:.6f}", "{:g}", "{:e}", "{:.2f}", "{:+.9E}")
TOKENS = [
    "nan", "inf", "-inf", "1e309", "-1e999", "99999999999999999999", "-1", "-7", "0", "3", "4",
    "1.5", "#", "# comment\n", "OFF", "OFF\n", "BINARY", "\n", "\n\n", " ", "\t", "\r\n", "0x1F",
    "1e", "--2", "+", ".", "e5", "\x00", "\x01", "\xff", "é", "\ufeff", "v 1 2 3\n", "f 1 2 3\n",
    "f -1 -2 -3\n", "f 1/1/1 2/2/2 3/3/3\n", "3 0 1 2\n", "2000000000 2000000000 0\n",
]


@pytest.fixture(scope="module", autouse=True)
def report_case_times(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    warm = tmp_path_factory.mktemp("warm") / "warm.obj"  # first trimesh call imports its readers
    warm.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    load_mesh(warm)
    yield
    for name, times in sorted(CASE_SECONDS.items()):
        arr = np.array(times) * 1e3
        print(f"\n{name}: {len(arr)} cases, median {np.median(arr):.2f} ms, max {arr.max():.1f} ms")


def timed_load(name: str, path: Path) -> Mesh:
    t0 = time.perf_counter()
    try:
        return load_mesh(path)
    finally:
        CASE_SECONDS.setdefault(name, []).append(time.perf_counter() - t0)


def check_valid(mesh: Mesh) -> None:
    """Everything the contract promises about a returned Mesh."""
    v, f = mesh.vertices, mesh.faces
    assert v.dtype == np.float32 and v.ndim == 2 and v.shape[1] == 3 and len(v) >= 3
    assert f.dtype == np.int32 and f.ndim == 2 and f.shape[1] == 3 and len(f) >= 1
    assert np.isfinite(v).all()
    assert f.min() >= 0 and f.max() < len(v)
    assert abs(float(np.linalg.norm(v.astype(np.float64), axis=1).max()) - 1.0) < 1e-5
    assert np.abs(v.min(axis=0) + v.max(axis=0)).max() < 2e-6


def load_or_refuse(name: str, path: Path) -> Mesh | None:
    """The fuzz oracle: a valid Mesh or a one-line MeshError; anything else fails the test."""
    try:
        mesh = timed_load(name, path)
    except MeshError as exc:
        assert str(exc) and "\n" not in str(exc)
        # the catch-all's wording: a bug in our own code, not a reasoned refusal
        assert not str(exc).startswith("unreadable mesh"), str(exc)
        return None
    check_valid(mesh)
    return mesh


# --------------------------------------------------------------------------------------------
# generated meshes


@st.composite
def polygon_meshes(draw: st.DrawFn, max_vertices: int = 10) -> tuple[list[list[str]], list[list[int]]]:
    """Vertex tokens (already formatted, so the reference sees the written values) and polygons."""
    n_v = draw(st.integers(3, max_vertices))
    fmt = draw(st.sampled_from(FORMATS))
    verts = [[fmt.format(draw(COORD)) for _ in range(3)] for _ in range(n_v)]
    polys = draw(st.lists(st.lists(st.integers(0, n_v - 1), min_size=3, max_size=6), min_size=1, max_size=8))
    return verts, polys


@st.composite
def off_texts(draw: st.DrawFn) -> tuple[str, np.ndarray, list[list[int]]]:
    verts, polys = draw(polygon_meshes())
    sep = draw(st.sampled_from([" ", "\t", "  ", " \t "]))
    header = draw(st.sampled_from(["plain", "glued", "same-line", "no-edges", "coff"]))
    face_colour = draw(st.sampled_from(["", " 255 0 0", " 0.5 0.5 0.5 1", " 7"]))
    n_v, n_f = len(verts), len(polys)
    if header == "plain":
        lines = ["OFF", f"{n_v} {n_f} 0"]
    elif header == "glued":
        lines = [f"OFF{n_v} {n_f} 0"]
    elif header == "same-line":
        lines = [f"OFF {n_v} {n_f} 0"]
    elif header == "no-edges":
        lines = ["OFF", f"{n_v} {n_f}"]
    else:
        lines = ["COFF", f"{n_v} {n_f} 0"]
    extra = " 0.1 0.2 0.3 1" if header == "coff" else ""
    lines += [sep.join(v) + extra for v in verts]
    lines += [sep.join(map(str, [len(p), *p])) + face_colour for p in polys]
    if draw(st.booleans()):  # comments and blank lines in the body
        at = draw(st.integers(1, len(lines)))
        lines[at:at] = ["", "# a comment", "   "]
        lines[0] += " # header comment"
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["end", "1.5 junk", "# trailing", ""])))
    nl = draw(st.sampled_from(["\n", "\r\n"]))
    text = nl.join(lines) + draw(st.sampled_from(["", nl]))
    return text, np.array([[float(x) for x in v] for v in verts]), polys


def reference(vertices: np.ndarray, polys: list[list[int]]) -> tuple[np.ndarray | None, np.ndarray]:
    """Expected normalised triangle corners (None if degenerate) and the fan triangles."""
    tris = np.array([[p[0], p[j], p[j + 1]] for p in polys for j in range(1, len(p) - 1)])
    used = vertices[np.unique(tris)]
    centre = used.min(axis=0) / 2 + used.max(axis=0) / 2
    radius = np.linalg.norm(used - centre, axis=1).max()
    if radius == 0:
        return None, tris
    corners = (vertices[tris] - centre) / radius
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    return (corners if (cross**2).sum(axis=1).max() > 1e-24 else None), tris


@settings(FUZZ, max_examples=400)
@given(case=off_texts())
def test_valid_off_parses_to_the_written_mesh(tmp_path: Path, case) -> None:
    text, vertices, polys = case
    path = tmp_path / "gen.off"
    path.write_text(text)
    corners, tris = reference(vertices, polys)
    mesh = load_or_refuse("valid OFF", path)
    if corners is None:  # degenerate as written: must be refused
        assert mesh is None
        return
    assert mesh is not None, text
    assert len(mesh.faces) == len(tris)
    np.testing.assert_allclose(mesh.vertices[mesh.faces], corners, atol=2e-6)
    if len(np.unique(tris)) == len(vertices):  # nothing dropped: indices kept as written
        np.testing.assert_array_equal(mesh.faces, tris)


# --------------------------------------------------------------------------------------------
# mutations


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "dup-line", "counts"]))
        at = data.draw(st.integers(0, max(len(buf) - 1, 0)), label="at")
        if op == "flip" and buf:
            buf[at] = data.draw(st.integers(0, 255), label="byte")
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = data.draw(st.sampled_from(TOKENS), label="token").encode()
        elif op == "delete":
            del buf[at : at + data.draw(st.integers(1, 12), label="span")]
        elif op == "dup-line":
            start = buf.rfind(b"\n", 0, at) + 1
            end = buf.find(b"\n", at)
            line = bytes(buf[start : (end if end >= 0 else len(buf))]) + b"\n"
            buf[start:start] = line * data.draw(st.integers(1, 3), label="copies")
        elif op == "counts":  # rewrite the first run of digits (usually a header count)
            text = bytes(buf)
            i = next((k for k, c in enumerate(text) if 48 <= c <= 57), None)
            if i is not None:
                j = i
                while j < len(text) and 48 <= text[j] <= 57:
                    j += 1
                new = data.draw(st.sampled_from(["-1", "0", "1", "2", "9999999999", "18446744073709551617",
                                                 "-99999999999999999999", "3.5", "1e3"]), label="count")
                buf[i:j] = new.encode()
    return bytes(buf)


@settings(FUZZ, max_examples=700)
@given(case=off_texts(), data=st.data())
def test_mutated_off_is_a_mesh_or_a_mesh_error(tmp_path: Path, case, data: st.DataObject) -> None:
    path = tmp_path / "mut.off"
    path.write_bytes(mutate(data, case[0].encode()))
    load_or_refuse("mutated OFF", path)


@st.composite
def obj_texts(draw: st.DrawFn) -> str:
    verts, polys = draw(polygon_meshes())
    lines = ["# generated", "o thing"] + ["v " + " ".join(v) for v in verts]
    style = draw(st.sampled_from(["plain", "slashes", "relative", "normals"]))
    if style == "normals":
        lines += ["vn 0 0 1", "vt 0 0"]
    for p in polys:
        if style == "plain":
            lines.append("f " + " ".join(str(i + 1) for i in p))
        elif style == "slashes":
            lines.append("f " + " ".join(f"{i + 1}//{i + 1}" for i in p))
        elif style == "relative":
            lines.append("f " + " ".join(str(i - len(verts)) for i in p))
        else:
            lines.append("f " + " ".join(f"{i + 1}/1/1" for i in p))
    return "\n".join(lines) + "\n"


@settings(FUZZ, max_examples=400)
@given(text=obj_texts(), data=st.data())
def test_obj_valid_or_mutated_is_a_mesh_or_a_mesh_error(
    tmp_path: Path, text: str, data: st.DataObject
) -> None:
    raw = text.encode()
    if data.draw(st.booleans(), label="mutate"):
        raw = mutate(data, raw)
    path = tmp_path / "gen.obj"
    path.write_bytes(raw)
    load_or_refuse("OBJ", path)
