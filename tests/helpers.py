"""Shared test helpers: ModelNet-layout trees built in temp dirs from the real dev meshes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from m3d.render import RAYCAST_NEEDS, raycast_available

#: tests of the raycast renderer: open3d is an extra (m3d[raycast]); make test and CI install it
needs_open3d = pytest.mark.skipif(not raycast_available(), reason=RAYCAST_NEEDS)
RAYCAST = pytest.param("raycast", marks=needs_open3d)  # a renderer parameter that skips without open3d


def make_tree(lpsb: Path, root: Path, classes: dict[str, int], *, copy: bool = False, split: str | None = "train") -> Path:
    """root/<class>/<split>/<id>.off for the first N meshes of each LPSB class (symlinks unless copy)."""
    for label, count in classes.items():
        sources = sorted((lpsb / label).glob("*.off"), key=lambda p: int(p.stem))[:count]
        folder = root / label / split if split else root / label
        folder.mkdir(parents=True, exist_ok=True)
        for src in sources:
            dest = folder / src.name
            if copy:
                shutil.copyfile(src, dest)
            else:
                dest.symlink_to(src)
    return root


def write_off(path: Path, vertices, faces) -> Path:
    """A plain OFF file (how a re-export of a mesh would look: new bytes, same shape)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    v, f = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    lines = [f"OFF\n{len(v)} {len(f)} 0\n", *(f"{a:.6f} {b:.6f} {c:.6f}\n" for a, b, c in v),
             *(f"3 {a} {b} {c}\n" for a, b, c in f)]
    path.write_text("".join(lines))
    return path


def perturbed_copy(src: Path, dest: Path, *, jitter: float = 0.0, degrees: float = 0.0, seed: int = 0) -> Path:
    """Re-save a mesh with every vertex moved by gaussian noise of `jitter` x its bounding radius and
    rotated by `degrees` about the y axis (the default up axis): a near duplicate, never a byte copy."""
    import numpy as np

    from m3d.meshio import load_mesh

    mesh = load_mesh(src)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    radius = float(np.linalg.norm(v - v.mean(0), axis=1).max())
    v = v + np.random.default_rng(seed).normal(scale=jitter * radius, size=v.shape)
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    return write_off(dest, v @ rot.T, mesh.faces)


# Planted copies (tests/test_dedup.py, benchmarks/dedup_planted.py): how each kind of duplicate is made
# from a mesh's raw vertices (float64) and faces, with a seeded generator.

def _jitter(scale: float):
    def move(v, f, rng):
        radius = float(np.linalg.norm(v - v.mean(0), axis=1).max())
        return v + rng.normal(scale=scale * radius, size=v.shape), f
    return move


def _decimate(v, f, rng):
    """Half the faces by quadric edge collapse (Open3D): a re-meshed copy whose surface moves a little."""
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(v), o3d.utility.Vector3iVector(f))
    mesh = mesh.simplify_quadric_decimation(len(f) // 2)
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles)


def _subdivide(v, f, rng):
    """Every triangle split in four at its edge midpoints (trimesh): re-triangulated, the same surface."""
    import trimesh

    return trimesh.remesh.subdivide(v, f)


def _rotate(scaled: bool):
    def turn(v, f, rng):
        from scipy.spatial.transform import Rotation

        rot = Rotation.random(random_state=rng).as_matrix()
        scale = 10 ** rng.uniform(-2, 2) if scaled else 1.0
        return scale * (v @ rot.T + (rng.normal(size=3) if scaled else 0.0)), f  # moved by about its size
    return turn


def _reorder(v, f, rng):
    """Vertices and faces in a new order (and each face's corners cycled): the same triangles."""
    order = rng.permutation(len(v))
    faces = np.argsort(order)[f][rng.permutation(len(f))]
    return v[order], np.roll(faces, int(rng.integers(1, 3)), axis=1)


import numpy as np  # noqa: E402  (the planting kinds need it; the helpers above import lazily)

#: How a planted copy is made, by name. A format name (obj, ply, stl, glb) converts the file through
#: trimesh; every other kind writes OFF.
PLANTS = {"jitter-1e-4": _jitter(1e-4), "jitter-1e-3": _jitter(1e-3), "decimate-50": _decimate,
          "subdivide": _subdivide, "rotate": _rotate(False), "rotate-scale": _rotate(True), "reorder": _reorder,
          "obj": None, "ply": None, "stl": None, "glb": None}


def plant_copy(src: Path, dest_stem: Path, kind: str, seed: int = 0) -> Path:
    """A copy of the mesh at src made by PLANTS[kind], written at dest_stem plus the kind's suffix;
    returns the file. Vertices are read raw (trimesh, process=False): the copy starts from the file's
    own coordinates, not m3d's normalised ones."""
    import trimesh

    from m3d.meshio import Mesh
    from m3d.meshio import write_off as write_mesh

    mesh = trimesh.load(str(src), force="mesh", process=False)
    v, f = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    make = PLANTS[kind]
    if make is not None:
        v, f = make(v, f, np.random.default_rng(seed))
    dest = dest_stem.with_name(dest_stem.name + (f".{kind}" if make is None else ".off"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if make is not None:
        return write_mesh(Mesh(v.astype(np.float32), f.astype(np.int32)), dest)
    trimesh.Trimesh(v, f, process=False).export(dest)
    return dest


def wait_for_first_write(proc) -> None:
    """Read a `m3d -v sync` process's stderr until its first upsert (the moment a kill tests a crash
    mid-sync); fail the test if the sync ends first."""
    import pytest

    for line in proc.stderr:
        if "upserted" in line:
            return
    proc.wait()
    pytest.fail("the sync ended before its first write")
