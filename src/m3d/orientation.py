"""Which way is up: the rotation applied to a mesh before its cameras see it.

Meshes come in several conventions (ModelNet +z up, the Princeton benchmark and glTF +y, STL mostly +z,
OBJ anything) while the cameras turn about +y. A :class:`Pose` is the proper rotation (det +1) that
takes a mesh into the cameras' frame, with where it came from:

- ``given``: the user named the up axis (``--up z``): that axis is turned to +y;
- ``pca``: ``--align pca``, principal axes with a deterministic sign rule (for arbitrarily rotated data).

Every rotation here is a pure axis permutation with signs (or, for pca, an orthonormal basis): the mesh
keeps its centre and its size, so framing does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .render import UP_AXES, ViewSettings

if TYPE_CHECKING:
    from .meshio import Mesh

#: The rotation that takes each axis convention to +y. For +z and +x these are the exact inverses of
#: the conversions y-up -> z-up (x, y, z) -> (x, -z, y) and y-up -> x-up (x, y, z) -> (y, z, x), so a
#: mesh converted either way and turned back is the original, vertex for vertex.
AXIS_ROTATIONS: dict[str, np.ndarray] = {
    "y": np.eye(3),
    "-y": np.diag([1.0, -1.0, -1.0]),  # half turn about x
    "z": np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),  # (x, y, z) -> (x, z, -y)
    "-z": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),  # (x, y, z) -> (x, -z, y)
    "x": np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]),  # (x, y, z) -> (z, x, y)
    "-x": np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]),  # (x, y, z) -> (y, -x, z)
}
assert set(AXIS_ROTATIONS) == set(UP_AXES)


@dataclass(frozen=True)
class Pose:
    """The rotation a mesh was rendered with: recorded in every point's payload."""

    rotation: np.ndarray  # (3, 3), applied to vertices as v @ rotation.T
    up: str  # the mesh axis that was turned up ("z", "-x", ...), or "pca"
    source: str  # "given" | "pca"

    def to_payload(self) -> dict:
        return {"up": self.up, "source": self.source,
                "rotation": [[round(float(x), 6) for x in row] for row in self.rotation]}


def area_samples(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Face centroids and areas: the surface as weighted points, independent of vertex density."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    tri = v[mesh.faces]
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    return tri.mean(axis=1), areas


def pca_rotation(mesh: Mesh) -> np.ndarray:
    """Principal axes of the surface: the largest spread goes to x, the smallest to y (up), the middle
    to z. Signs: each of x and y points to where the surface's third moment is positive (the side with
    the longer tail), z completes a right-handed frame, so any rotation of a mesh gives the same pose
    unless its moments tie (a symmetric object, where either sign shows the same shape)."""
    points, w = area_samples(mesh)
    w = w / max(float(w.sum()), 1e-300)
    centred = points - w @ points
    cov = (centred * w[:, None]).T @ centred
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    x_axis, y_axis = vecs[:, 2], vecs[:, 0]
    rows = []
    for axis in (x_axis, y_axis):
        skew = float(w @ (centred @ axis) ** 3)
        rows.append(axis if skew >= 0 else -axis)
    rows.append(np.cross(rows[0], rows[1]))
    return np.stack(rows)


def pose(mesh: Mesh, view: ViewSettings) -> Pose:
    """The pose the view settings ask for, for one mesh."""
    if view.align == "pca":
        return Pose(pca_rotation(mesh), "pca", "pca")
    return Pose(AXIS_ROTATIONS[view.up], view.up, "given")
