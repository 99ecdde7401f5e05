"""Do two meshes have the same shape? Alignment and a symmetric surface distance, on the meshes.

The second stage of `m3d dedup`: an embedding only proposes pairs; this module decides them.

- :func:`prepare` (once per object): area-weighted surface samples (orientation.surface_samples),
  centred on their centroid and scaled to the unit sphere (largest vertex distance 1), the principal
  axes of the surface (orientation.pca_rotation) and a KD-tree of the samples.
- :func:`compare` (per pair): the second shape is turned onto the first over the poses that matter,
  the principal axes of each under every proper signed permutation (the 24 rotations of a cube: sign
  flips and swapped axes, for axes whose spreads tie), the best few refined by a short ICP; then the
  Chamfer distance (mean nearest-sample distance, both ways) and the Hausdorff distance (the largest),
  both relative to the unit radius, and the rotation that aligned them.

Only proper rotations (det +1): a mirror image is a different asset (a left and a right part), so it
is never "the same geometry". Two independent samplings of one surface are not at distance 0:
:attr:`Shape.spacing` is the mean distance between samples, sqrt(area / samples), and the kinds are
decided in that unit (`sampling noise`), so one threshold holds for any mesh and any sample count.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .orientation import area_samples, pca_rotation, surface_samples

if TYPE_CHECKING:
    from scipy.spatial import cKDTree

    from .meshio import Mesh

SAMPLES = 4000  # surface samples per object
COARSE_POINTS = 120  # samples that score each starting pose
REFINED_POSES = 5  # at most this many of the best starting poses are refined by ICP,
ROUGH_MARGIN = 1.3  # those within this factor of the best one's score (a symmetric part has several)
ICP_POINTS = 800  # samples moved by each ICP step
ICP_STEPS = 6  # point-to-point steps (sample to nearest sample, a k-d tree)
TIE = 0.15  # relative difference of two axes' spreads under which their directions are unreliable
TIE_STEP = 20.0  # degrees between extra starting turns about the remaining axis
RANDOM_TURNS = 200  # starting rotations for shapes without any reliable axis
SURFACE_STEPS = 4  # then point-to-surface steps (sample to the closest point of the other's triangles)


def _proper_signed_permutations() -> np.ndarray:
    """The 24 rotation matrices that map coordinate axes onto coordinate axes (det +1)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return np.stack(out)


CUBE_ROTATIONS = _proper_signed_permutations()


@dataclass(frozen=True, eq=False)
class Shape:
    """One object's surface, ready to be compared (build with :func:`prepare`)."""

    points: np.ndarray  # (SAMPLES, 3) surface samples, centroid at 0, inside the unit sphere
    vertices: np.ndarray  # (V, 3) float32, the mesh in the same unit-sphere frame
    faces: np.ndarray  # (F, 3)
    axes: np.ndarray  # (3, 3) principal axes as rows (a proper rotation)
    spreads: np.ndarray  # (3,) the samples' standard deviation along each axis
    centre: np.ndarray  # (3,) the centroid in the loaded mesh's coordinates
    scale: float  # loaded-mesh units per unit here
    spacing: float  # mean distance between samples: sqrt(area / samples), in unit-radius units
    tree: "cKDTree"

    @functools.cached_property
    def surface(self):
        """The triangles as an Open3D ray-casting scene: exact point-to-surface distances."""
        import open3d as o3d

        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(self.vertices), o3d.core.Tensor(self.faces.astype(np.uint32)))
        return scene

    def closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The closest surface point to each point, and its triangle's unit normal. Open3D's BVH picks
        the triangle; the point on it is computed here in float64: Open3D's own answer, in float32, was
        measured 1.8e-4 of the radius off a sample lying on a thin LPSB triangle (Cup/38)."""
        import open3d as o3d

        hit = self.surface.compute_closest_points(o3d.core.Tensor(points.astype(np.float32)))
        tri = self.vertices[self.faces[hit["primitive_ids"].numpy().astype(np.int64)]].astype(np.float64)
        normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-300)
        return closest_on_triangles(points, tri), normals

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Each point's distance to the surface (float64, see closest)."""
        return np.linalg.norm(points - self.closest(points)[0], axis=1)


def closest_on_triangles(p: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """The closest point of triangle tri[i] (n, 3, 3) to p[i] (n, 3), by the Voronoi regions of its
    vertices, edges and face (Ericson, Real-Time Collision Detection, 5.1.5), vectorised."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, ac, ap = b - a, c - a, p - a
    dot = lambda x, y: np.einsum("ij,ij->i", x, y)  # noqa: E731
    d1, d2 = dot(ab, ap), dot(ac, ap)
    bp, cp = p - b, p - c
    d3, d4, d5, d6 = dot(ab, bp), dot(ac, bp), dot(ab, cp), dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = va + vb + vc
        out = a + ab * (vb / denom)[:, None] + ac * (vc / denom)[:, None]  # inside the face
        edge_ab = a + ab * (d1 / (d1 - d3))[:, None]
        edge_ac = a + ac * (d2 / (d2 - d6))[:, None]
        edge_bc = b + (c - b) * ((d4 - d3) / ((d4 - d3) + (d5 - d6)))[:, None]
    cases = [  # later cases win: Ericson's early returns (A, B, AB, C, AC, BC, face) in reverse
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), edge_bc),
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), edge_ac),
        ((d6 >= 0) & (d5 <= d6), c),
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), edge_ab),
        ((d3 >= 0) & (d4 <= d3), b),
        ((d1 <= 0) & (d2 <= 0), a),
    ]
    for mask, point in cases:
        out = np.where(mask[:, None], point, out)
    return np.where(np.isfinite(out), out, a)  # a degenerate (zero-area) triangle: its first corner


def prepare(mesh: Mesh, samples: int = SAMPLES) -> Shape:
    """A mesh's comparable form: unit sphere about its surface centroid, samples, axes, tree."""
    from scipy.spatial import cKDTree

    centroids, areas = area_samples(mesh)
    centre = (areas @ centroids) / max(float(areas.sum()), 1e-300)
    v = np.asarray(mesh.vertices, dtype=np.float64) - centre
    scale = float(np.sqrt(np.einsum("ij,ij->i", v, v).max()))
    points = (surface_samples(mesh, samples) - centre) / scale
    spacing = float(np.sqrt(areas.sum() / scale**2 / samples))
    axes = pca_rotation(mesh)
    unit = (v / scale).astype(np.float32)
    return Shape(points, unit, np.asarray(mesh.faces), axes, (points @ axes.T).std(axis=0), centre, scale, spacing,
                 cKDTree(points))


@dataclass(frozen=True)
class Match:
    """How far apart two aligned surfaces are. Distances are relative to the unit radius; the noise
    figures divide them by the pair's sampling spacing (~0.5 for two samplings of one surface)."""

    chamfer: float
    hausdorff: float
    spacing: float  # the larger of the two shapes' sample spacings
    rotation: np.ndarray  # (3, 3): b's loaded-mesh coordinates turned onto a's (a ~ R b, about centroids)

    @property
    def chamfer_noise(self) -> float:
        return self.chamfer / self.spacing

    @property
    def hausdorff_noise(self) -> float:
        return self.hausdorff / self.spacing

    @property
    def angle(self) -> float:
        """Degrees the alignment turned b by."""
        return float(np.degrees(np.arccos(np.clip((np.trace(self.rotation) - 1) / 2, -1.0, 1.0))))

    def swapped(self) -> "Match":
        """The same match seen from b: the inverse rotation."""
        return Match(self.chamfer, self.hausdorff, self.spacing, self.rotation.T)

    def to_json(self) -> dict:
        return {"chamfer": round(self.chamfer, 6), "hausdorff": round(self.hausdorff, 6),
                "spacing": round(self.spacing, 6), "chamfer_noise": round(self.chamfer_noise, 3),
                "hausdorff_noise": round(self.hausdorff_noise, 3), "angle_degrees": round(self.angle, 2),
                "rotation": [[round(float(x), 6) for x in row] for row in self.rotation]}


def _about(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _frame_turns(a: Shape, b: Shape) -> list[np.ndarray]:
    """Rotations between the two principal frames worth trying: the 24 cube rotations, and where two
    axes' spreads tie (a turned part, a round table) their directions are arbitrary in their plane,
    so also every TIE_STEP degrees about the third axis; where all three tie, RANDOM_TURNS rotations."""
    turns = list(CUBE_ROTATIONS)
    tied = [k for k in range(3) if _ties(a, k) or _ties(b, k)]
    if len(tied) >= 2:
        from scipy.spatial.transform import Rotation

        turns += list(Rotation.random(RANDOM_TURNS, random_state=0).as_matrix())
    elif tied:
        turns += [p @ _about(tied[0], d) for p in CUBE_ROTATIONS for d in np.arange(TIE_STEP, 90, TIE_STEP)]
    return turns


def _ties(shape: Shape, axis: int) -> bool:
    """True when the spreads of the two axes other than `axis` are within TIE of each other."""
    i, j = [k for k in range(3) if k != axis]
    return abs(shape.spreads[i] - shape.spreads[j]) <= TIE * max(shape.spreads[i], shape.spreads[j])


def _kabsch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The proper rotation R and translation t minimising |R src + t - dst| (rows are points)."""
    cs, cd = src.mean(0), dst.mean(0)
    u, _, vt = np.linalg.svd((src - cs).T @ (dst - cd))
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cd - r @ cs


def _point_to_plane(src: np.ndarray, dst: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One linearised point-to-plane step (Chen and Medioni): the small rotation and translation that
    move src onto the tangent planes at dst. Converges in a few steps where point-to-point ICP
    crawls along the surface."""
    a = np.hstack([np.cross(src, normals), normals])
    b = -np.einsum("ij,ij->i", src - dst, normals)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    angle = float(np.linalg.norm(x[:3]))
    if angle < 1e-15:
        return np.eye(3), x[3:]
    k = np.array([[0, -x[2], x[1]], [x[2], 0, -x[0]], [-x[1], x[0], 0]]) / angle
    r = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k  # Rodrigues: stays a rotation
    return r, x[3:]


def compare(a: Shape, b: Shape, give_up: float = np.inf) -> Match:
    """Align b onto a (principal-axis poses, the best few refined by ICP) and measure both ways.

    give_up: a pose whose mean sample-to-sample distance after the point-to-point steps is above it
    is not refined on the surface (two samplings of one surface are ~0.5 spacing apart, so a caller
    that only wants pairs within a bound D passes D plus a spacing or more). The pair is still
    measured, in the best pose found."""
    step_coarse = max(1, len(b.points) // COARSE_POINTS)
    step_icp = max(1, len(b.points) // ICP_POINTS)
    coarse, fine = b.points[::step_coarse], b.points[::step_icp]
    starts = np.stack([a.axes.T @ p @ b.axes for p in _frame_turns(a, b)])  # b's axes onto a's
    distances = a.tree.query((coarse @ starts.transpose(0, 2, 1)).reshape(-1, 3))[0]
    scores = distances.reshape(len(starts), -1).mean(axis=1)
    best, rough = None, None
    order = np.argsort(scores)[:REFINED_POSES]
    for n in order[scores[order] <= ROUGH_MARGIN * scores[order[0]]]:
        r, t = starts[n], np.zeros(3)
        for _ in range(ICP_STEPS):  # sample to sample: robust from a rough start
            moved = fine @ r.T + t
            gaps, rows = a.tree.query(moved)
            dr, dt = _kabsch(moved, a.points[rows])
            r, t = dr @ r, dr @ t + dt
        if rough is None or gaps.mean() < rough[0]:
            rough = (float(gaps.mean()), r, t)
        if gaps.mean() > give_up:
            continue
        for _ in range(SURFACE_STEPS):  # samples onto a's triangles: converges to the exact pose of a copy
            moved = fine @ r.T + t
            dr, dt = _point_to_plane(moved, *a.closest(moved))
            r, t = dr @ r, dr @ t + dt
        # judged on the surface, not on samples: two samplings of one surface are ~half a spacing
        # apart, enough to hide the small feature that tells a symmetric part's true pose from a turn
        score = float(a.distance(fine @ r.T + t).mean())
        if best is None or score < best[0]:
            best = (score, r, t)
        if score < 1e-6:  # float rounding: nothing closer to find
            break
    _, r, t = best or rough
    d_ba = a.distance(b.points @ r.T + t)
    d_ab = b.distance((a.points - t) @ r)  # a's samples moved into b's frame: the inverse transform
    return Match(chamfer=float((d_ab.mean() + d_ba.mean()) / 2), hausdorff=float(max(d_ab.max(), d_ba.max())),
                 spacing=max(a.spacing, b.spacing), rotation=r)
