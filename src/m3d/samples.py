"""A small synthetic dataset the project can make by itself (no download): primitive shapes with
seeded random proportions, written as OFF in the ModelNet layout, so the whole pipeline can be tried
on a fresh machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ("box", "sphere", "cylinder", "cone", "capsule", "torus")


def _make(shape: str, rng: np.random.Generator):
    import trimesh

    if shape == "box":
        return trimesh.creation.box(extents=rng.uniform(0.4, 1.6, size=3))
    if shape == "sphere":
        return trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    if shape == "cylinder":
        return trimesh.creation.cylinder(radius=rng.uniform(0.3, 0.8), height=rng.uniform(0.8, 2.0), sections=48)
    if shape == "cone":
        return trimesh.creation.cone(radius=rng.uniform(0.4, 1.0), height=rng.uniform(0.8, 2.0), sections=48)
    if shape == "capsule":
        return trimesh.creation.capsule(height=rng.uniform(0.5, 2.0), radius=rng.uniform(0.2, 0.6), count=[24, 24])
    return trimesh.creation.torus(major_radius=1.0, minor_radius=rng.uniform(0.15, 0.45), major_sections=48,
                                  minor_sections=24)


def write_samples(root: str | Path, *, per_class: int = 8, seed: int = 0) -> list[Path]:
    """Write per_class meshes of each shape to root/<shape>/train/<shape>_NNNN.off; returns the paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for shape in SHAPES:
        folder = Path(root) / shape / "train"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mesh = _make(shape, rng)
            mesh.apply_scale(rng.uniform(0.7, 1.3, size=3))  # anisotropic stretch: not all alike
            path = folder / f"{shape}_{i + 1:04d}.off"
            path.write_text(mesh.export(file_type="off"))
            paths.append(path)
    return paths
