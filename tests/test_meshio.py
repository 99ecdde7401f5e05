"""meshio: real LPSB meshes, OFF dialects, a malformed corpus, and the trimesh formats."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from m3d.errors import MeshError
from m3d.meshio import DEFAULT_MAX_FACES, MESH_EXTENSIONS, Mesh, load_mesh

CLASSES = ("Airplane", "Cup", "Octopus", "Teddy")


def reference_off(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Independent slow reader for the clean LPSB files: (vertices, triangles, header F)."""
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    assert lines[0] == ["OFF"]
    n_v, n_f = int(lines[1][0]), int(lines[1][1])
    vertices = np.loadtxt([" ".join(t) for t in lines[2 : 2 + n_v]], dtype=np.float64)
    faces = np.array([[int(x) for x in t[1:4]] for t in lines[2 + n_v : 2 + n_v + n_f]])
    assert all(t[0] == "3" for t in lines[2 + n_v : 2 + n_v + n_f])
    return vertices, faces, n_f


def normalised_corners(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3, 3) triangle corners after centring on the referenced bbox and unit max radius."""
    used = vertices[np.unique(faces)]
    centre = (used.min(axis=0) + used.max(axis=0)) / 2
    radius = np.linalg.norm(used - centre, axis=1).max()
    return (vertices[faces] - centre) / radius


def assert_normalised(mesh: Mesh) -> None:
    assert mesh.vertices.dtype == np.float32 and mesh.vertices.ndim == 2 and mesh.vertices.shape[1] == 3
    assert mesh.faces.dtype == np.int32 and mesh.faces.ndim == 2 and mesh.faces.shape[1] == 3
    assert mesh.vertices.flags.c_contiguous and mesh.faces.flags.c_contiguous
    assert np.isfinite(mesh.vertices).all()
    assert mesh.faces.min() >= 0 and mesh.faces.max() < len(mesh.vertices)
    radius = np.linalg.norm(mesh.vertices.astype(np.float64), axis=1).max()
    assert abs(radius - 1.0) < 1e-5
    lo, hi = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-6)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def reject(path: Path, keyword: str, **kw) -> str:
    with pytest.raises(MeshError) as info:
        load_mesh(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert keyword.lower() in msg.lower(), msg
    return msg


SQUARE = "4 2 0\n0 0 0\n2 0 0\n2 2 0\n0 2 0\n3 0 1 2\n3 0 2 3\n"


# --------------------------------------------------------------------------------------------
# real meshes


@pytest.mark.parametrize("cls", CLASSES)
def test_lpsb_class_loads_normalised_and_matches_reference_reader(lpsb: Path, cls: str) -> None:
    files = sorted((lpsb / cls).glob("*.off"))
    assert len(files) == 20
    for i, path in enumerate(files):
        mesh = load_mesh(path)
        assert_normalised(mesh)
        if i % 5:  # the slow reference reader on every fifth file keeps this test quick
            continue
        vertices, faces, n_faces = reference_off(path)
        assert len(mesh.faces) == n_faces
        np.testing.assert_allclose(mesh.vertices[mesh.faces], normalised_corners(vertices, faces), atol=2e-6)


def test_lpsb_face_count_equals_header_for_every_class(lpsb: Path) -> None:
    for cls_dir in sorted(p for p in lpsb.iterdir() if p.is_dir()):
        path = sorted(cls_dir.glob("*.off"))[0]
        with open(path) as fh:
            assert fh.readline().strip() == "OFF"
            n_faces = int(fh.readline().split()[1])
        assert len(load_mesh(path).faces) == n_faces


def test_stray_vertex_does_not_change_scale(lpsb: Path, tmp_path: Path) -> None:
    src = lpsb / "Cup" / "21.off"
    lines = src.read_text().splitlines()
    n_v, n_f, _ = map(int, lines[1].split())
    # one far-away vertex that no face uses, appended after the real ones
    strayed = ["OFF", f"{n_v + 1} {n_f} 0", *lines[2 : 2 + n_v], "1000 1000 1000", *lines[2 + n_v :]]
    clean, stray = load_mesh(src), load_mesh(write(tmp_path, "stray.off", "\n".join(strayed) + "\n"))
    assert len(stray.vertices) == len(clean.vertices)
    np.testing.assert_array_equal(stray.vertices[stray.faces], clean.vertices[clean.faces])


def test_max_faces_is_enforced_with_the_limit_in_the_message(lpsb: Path) -> None:
    path = lpsb / "Cup" / "21.off"
    n_faces = len(load_mesh(path).faces)
    assert len(load_mesh(path, max_faces=n_faces).faces) == n_faces
    reject(path, f"max_faces={n_faces - 1}", max_faces=n_faces - 1)
    assert DEFAULT_MAX_FACES == 2_000_000


# --------------------------------------------------------------------------------------------
# OFF dialects


def test_modelnet_header_defect_parses_like_the_fixed_header(lpsb: Path, tmp_path: Path) -> None:
    data = (lpsb / "Chair" / "101.off").read_bytes()
    assert data.startswith(b"OFF\n")
    fixed = load_mesh(write(tmp_path, "fixed.off", data))
    glued = load_mesh(write(tmp_path, "glued.off", b"OFF" + data[4:]))  # 'OFF490 518 0'
    same_line = load_mesh(write(tmp_path, "same.off", b"OFF " + data[4:]))
    for other in (glued, same_line):
        np.testing.assert_array_equal(other.vertices, fixed.vertices)
        np.testing.assert_array_equal(other.faces, fixed.faces)


def test_quad_is_two_triangles_with_the_right_indices(tmp_path: Path) -> None:
    mesh = load_mesh(write(tmp_path, "quad.off", "OFF\n4 1 0\n0 0 0\n2 0 0\n2 2 0\n0 2 0\n4 0 1 2 3\n"))
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    s = np.sqrt(0.5)
    np.testing.assert_allclose(mesh.vertices, [[-s, -s, 0], [s, -s, 0], [s, s, 0], [-s, s, 0]], atol=1e-7)


def test_mixed_polygons_are_fan_triangulated(tmp_path: Path) -> None:
    text = "OFF\n6 3 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n0.5 2 0\n3 3 1\n3 0 1 2\n5 0 1 4 2 3\n4 5 0 1 2\n"
    mesh = load_mesh(write(tmp_path, "mixed.off", text))
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 1, 4], [0, 4, 2], [0, 2, 3], [5, 0, 1], [5, 1, 2]]


@pytest.mark.parametrize(
    "text",
    [
        "OFF\n" + SQUARE,
        "OFF4 2 0\n" + SQUARE.split("\n", 1)[1],
        "OFF 4 2 0\n" + SQUARE.split("\n", 1)[1],
        "OFF\n4 2\n" + SQUARE.split("\n", 1)[1],  # no edge count
        "# made by hand\nOFF # header\n\n" + SQUARE.replace("\n3 0 1 2", "\n# faces\n\n3 0 1 2  # first"),
        ("OFF\n" + SQUARE).replace("\n", "\r\n"),
        ("OFF\n" + SQUARE).replace("\n", "\r"),
        ("OFF\n" + SQUARE).replace(" ", "\t  "),
        "OFF\n" + SQUARE + "end of file junk\n1.5 nonsense\n",
        "OFF\n" + SQUARE.replace("3 0 1 2", "3 0 1 2 255 0 0").replace("3 0 2 3", "3 0 2 3 0.5 0.5 0.5 1"),
        "COFF\n4 2 0\n" + SQUARE.split("\n", 1)[1].replace(" 0\n", " 0 1 0 0 1\n", 4),  # RGBA
        "NOFF\n4 2 0\n" + SQUARE.split("\n", 1)[1].replace(" 0\n", " 0 0 0 1\n", 4),  # normals
        "OFF\n4 2 0\n0.0e0 0 0\n2.000 0 0\n+2 2.0e+00 0\n0. 20e-1 -0\n3 0 1 2\n3 0 2 3\n",
        "\ufeffOFF\n" + SQUARE,  # UTF-8 byte-order mark
        "OFF\n" + SQUARE.rstrip("\n"),  # no final newline
    ],
    ids=["plain", "glued", "same-line", "no-edges", "comments", "crlf", "cr", "tabs", "junk", "face-colour",
         "coff", "noff", "number-forms", "bom", "no-final-newline"],
)
def test_off_variants_give_the_same_square(tmp_path: Path, text: str) -> None:
    mesh = load_mesh(write(tmp_path, "v.off", text))
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    s = np.sqrt(0.5)
    np.testing.assert_allclose(mesh.vertices, [[-s, -s, 0], [s, -s, 0], [s, s, 0], [-s, s, 0]], atol=1e-7)


def test_uppercase_extension_and_extension_set(tmp_path: Path) -> None:
    assert MESH_EXTENSIONS == frozenset({".off", ".obj", ".ply", ".stl", ".glb", ".gltf"})
    assert len(load_mesh(write(tmp_path, "UPPER.OFF", "OFF\n" + SQUARE)).faces) == 2


# --------------------------------------------------------------------------------------------
# the malformed corpus: every file is refused with a reason that names the problem

V3 = "0 0 0\n1 0 0\n0 1 0\n"
MALFORMED = {
    "empty": (b"", "empty"),
    "whitespace-only": (b"  \n\n \t\n", "empty"),
    "truncated-lines": (("OFF\n" + SQUARE)[:-8].encode(), "truncated"),
    "truncated-mid-face": (("OFF\n" + SQUARE)[:-3].encode(), "truncated"),
    "truncated-after-header": (b"OFF\n", "truncated"),
    "vertex-count-too-small": (b"OFF\n3 2 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n3 0 1 2\n3 0 2 3\n", "disagree"),
    "face-count-too-small": (("OFF\n" + SQUARE).replace("4 2 0", "4 1 0").encode(), "disagree"),
    "vertex-line-short": (b"OFF\n3 1 0\n0 0 0\n1 0\n0 1 0 \n3 0 1 2\n", "disagree"),
    "face-too-few-values": (b"OFF\n3 2 0\n" + V3.encode() + b"4 0 1 2\n3 0 1 2\n", "disagree"),
    "nan": (b"OFF\n3 1 0\n0 0 0\nnan 0 0\n0 1 0\n3 0 1 2\n", "NaN"),
    "inf": (b"OFF\n3 1 0\n0 0 0\n1 -inf 0\n0 1 0\n3 0 1 2\n", "inf"),
    "overflow-to-inf": (b"OFF\n3 1 0\n0 0 0\n1e999 0 0\n0 1 0\n3 0 1 2\n", "non-finite"),
    "index-out-of-range": (b"OFF\n3 1 0\n" + V3.encode() + b"3 0 1 3\n", "out of range"),
    "index-negative": (b"OFF\n3 1 0\n" + V3.encode() + b"3 0 -1 2\n", "negative"),
    "index-not-integer": (b"OFF\n3 1 0\n" + V3.encode() + b"3 0 1.5 2\n", "non-integer"),
    "zero-faces": (b"OFF\n3 0 0\n" + V3.encode(), "no faces"),
    "zero-vertices": (b"OFF\n0 0 0\n", "no vertices"),
    "one-point": (b"OFF\n3 1 0\n1 2 3\n1 2 3\n1 2 3\n3 0 1 2\n", "one point"),
    "collinear": (b"OFF\n3 1 0\n0 0 0\n1 1 1\n2 2 2\n3 0 1 2\n", "zero area"),
    "repeated-index": (b"OFF\n3 1 0\n" + V3.encode() + b"3 0 0 1\n", "zero area"),
    "binary-garbage": (bytes(range(256)) * 16, "binary"),
    "random-bytes": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "binary"),
    "not-utf8": (b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n# caf\xe9\n", "UTF-8"),
    "control-bytes": (b"OFF\n3 1 0\n0 0 0\n1 0\x01 0\n0 1 0\n3 0 1 2\n", "binary"),
    "binary-off": (b"OFF BINARY\n\x00\x00\x00\x03\x00\x00\x00\x01", "binary OFF"),
    "no-keyword": (b"3 1 0\n" + V3.encode() + b"3 0 1 2\n", "header"),
    "other-keyword": (b"PLY\n3 1 0\n" + V3.encode() + b"3 0 1 2\n", "header"),
    "4d-off": (b"4OFF\n3 1 0\n0 0 0 1\n1 0 0 1\n0 1 0 1\n3 0 1 2\n", "unsupported"),
    "counts-not-numbers": (b"OFF\nthree one zero\n" + V3.encode() + b"3 0 1 2\n", "malformed header"),
    "negative-count": (b"OFF\n-3 1 0\n" + V3.encode() + b"3 0 1 2\n", "negative"),
    "non-numeric-vertex": (b"OFF\n3 1 0\n0 0 0\n1 x 0\n0 1 0\n3 0 1 2\n", "non-numeric"),
    "non-numeric-face": (b"OFF\n3 1 0\n" + V3.encode() + b"3 0 one 2\n", "non-numeric"),
    "huge-claim": (b"OFF\n2000000000 1 0\n" + V3.encode() + b"3 0 1 2\n", "claims"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_off_is_rejected_with_a_reason(tmp_path: Path, case: str) -> None:
    data, keyword = MALFORMED[case]
    reject(write(tmp_path, f"{case}.off", data), keyword)


def test_huge_claims_are_refused_before_allocating(tmp_path: Path) -> None:
    body = b"0.125 0.25 0.5\n" * 70_000  # ~1 MB of honest vertex lines
    cases = [
        (b"OFF\n1000000000 1 0\n" + body, {}),
        (b"OFF\n3 4000000000 0\n" + body, {"max_faces": 10**10}),
        (b"OFF 99999999999999999999 99999999999999999999 0\n" + body, {"max_faces": 10**30}),
    ]
    for i, (data, kw) in enumerate(cases):
        path = write(tmp_path, f"claim{i}.off", data)
        tracemalloc.start()
        try:
            msg = reject(path, "claims", **kw)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 50 * 2**20, (peak, msg)
        assert "can hold" in msg


def test_header_face_count_above_max_faces_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "many.off", "OFF\n3 5 0\n" + V3 + "3 0 1 2\n" * 5)
    reject(path, "max_faces=4", max_faces=4)
    quads = write(tmp_path, "quads.off", "OFF\n4 3 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n" + "4 0 1 2 3\n" * 3)
    reject(quads, "max_faces=5", max_faces=5)  # 3 faces but 6 triangles
    assert len(load_mesh(quads, max_faces=6).faces) == 6
    big = write(tmp_path, "big.off", "OFF\n3 1 0\n" + V3 + "3 0 1 2\n" + "# padding\n" * 120_000)
    reject(big, "too large for the limit max_faces=1", max_faces=1)  # refused by size, unread
    assert len(load_mesh(big).faces) == 1


def test_filesystem_problems_are_mesh_errors(tmp_path: Path) -> None:
    good = write(tmp_path, "good.off", "OFF\n" + SQUARE)
    (tmp_path / "folder.off").mkdir()
    reject(tmp_path / "folder.off", "directory")
    os.symlink(tmp_path / "nowhere.off", tmp_path / "broken.off")
    reject(tmp_path / "broken.off", "broken symlink")
    os.symlink(tmp_path / "loop_b.off", tmp_path / "loop_a.off")
    os.symlink(tmp_path / "loop_a.off", tmp_path / "loop_b.off")
    reject(tmp_path / "loop_a.off", "symlink loop")
    reject(tmp_path / "missing.off", "no such file")
    reject(write(tmp_path, "mesh.xyz", "OFF\n" + SQUARE), "unsupported extension")
    reject(write(tmp_path, "noext", "OFF\n" + SQUARE), "unsupported extension")
    os.mkfifo(tmp_path / "pipe.off")  # reading it would block forever
    reject(tmp_path / "pipe.off", "not a regular file")
    os.symlink(good, tmp_path / "link.off")  # a working symlink is fine
    assert len(load_mesh(tmp_path / "link.off").faces) == 2
    assert len(load_mesh(str(good)).faces) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_mesh_error(tmp_path: Path) -> None:
    path = write(tmp_path, "secret.off", "OFF\n" + SQUARE)
    path.chmod(0)
    try:
        reject(path, "permission denied")
    finally:
        path.chmod(0o644)


# --------------------------------------------------------------------------------------------
# trimesh formats


@pytest.mark.parametrize("fmt", ["obj", "ply", "stl", "glb", "gltf"])
def test_other_formats_round_trip_through_trimesh(lpsb: Path, tmp_path: Path, fmt: str) -> None:
    import trimesh

    src = load_mesh(lpsb / "Teddy" / "161.off")
    tm = trimesh.Trimesh(src.vertices * 3.0 + 7.0, src.faces, process=False)  # not pre-normalised
    path = tmp_path / f"teddy.{fmt}"
    if fmt == "gltf":  # the .gltf JSON names its buffer files: write them all beside it
        for name, blob in trimesh.exchange.gltf.export_gltf(trimesh.Scene(tm)).items():
            (tmp_path / name).write_bytes(blob)
        (tmp_path / "model.gltf").rename(path)
    else:
        tm.export(path)
    mesh = load_mesh(path)
    assert_normalised(mesh)
    assert len(mesh.faces) == len(src.faces)
    np.testing.assert_allclose(mesh.vertices[mesh.faces], src.vertices[src.faces], atol=2e-6)
    reject(path, f"max_faces={len(src.faces) - 1}", max_faces=len(src.faces) - 1)


def test_trimesh_formats_share_the_validation(tmp_path: Path) -> None:
    obj_ok = "v 0 0 0\nv 2 0 0\nv 2 2 0\nv 0 2 0\nf 1 2 3 4\n"
    mesh = load_mesh(write(tmp_path, "quad.obj", obj_ok))
    assert len(mesh.faces) == 2
    assert_normalised(mesh)
    reject(write(tmp_path, "nan.obj", obj_ok.replace("v 2 0 0", "v nan 0 0")), "non-finite")
    reject(write(tmp_path, "point.obj", "v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n"), "one point")
    reject(write(tmp_path, "nofaces.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n"), "no faces")
    reject(write(tmp_path, "many.obj", obj_ok), "max_faces=1", max_faces=1)
    reject(write(tmp_path, "empty.stl", b""), "empty")
    reject(write(tmp_path, "garbage.glb", bytes(range(256)) * 4), "GLB")
    bad_ply = b"ply\nformat ascii 1.0\nelement vertex 99\nend_header\n1 2"
    reject(write(tmp_path, "garbage.ply", bad_ply), "PLY")
