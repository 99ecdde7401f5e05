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
