"""Which way is up: the rotation applied to a mesh before its cameras see it.

Meshes come in several conventions (ModelNet +z up, the Princeton benchmark and glTF +y, STL mostly +z,
OBJ anything) while the cameras turn about +y. A :class:`Pose` is the proper rotation (det +1) that
takes a mesh into the cameras' frame, with where it came from:

- ``given``: the user named the up axis (``--up z``): that axis is turned to +y;
- ``object``: ``--up auto`` on the object's own evidence (a single file, or a mixed library);
- ``dataset``: ``--up auto`` where the dataset's consensus decided (objects of one convention);
- ``pca``: ``--align pca``, principal axes with a deterministic sign rule (for arbitrarily rotated data).

Auto up, in three parts. Evidence: for each of the six axis directions, a few shape measurements of
the object as if that direction were up (flat convex-hull base, base under the centroid, top-bottom
asymmetry, a wide bottom slab against a narrow top, where the centre of mass sits, a round plan),
combined by a conditional-logit model fitted on LPSB meshes labelled by eye (benchmarks/orientation.py
refits it and measures it on held-out classes) into a log-probability per direction. The features are
equivariant (rotating a mesh by an axis permutation permutes its evidence the same way), so the shape
alone says the same of a mesh in any of the six conventions. Conventions: before any shape is seen,
files are up along +x, +y or +z (upside-down files are rare) and a glTF file along +Y, its spec's axis.
Consensus, one per file format of a dataset (`DatasetUp`): the prior over the six directions, a MAP
estimate by EM from that format's objects' evidence with the conventions as a few pseudo-objects. Where
one direction holds at least half of it (ModelNet: +z) the objects agree, and each takes the direction
with the highest prior x (tempered) evidence: ambiguous shapes get the dataset's convention unless their
own evidence is overwhelming. Where no direction does (a mixed library), and for a lone file, each
object takes its own evidence under its file's conventions.

Every rotation here is a pure axis permutation with signs (or, for pca, an orthonormal basis): the mesh
keeps its centre and its size, so framing does not change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

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
    source: str  # "given" | "object" | "dataset" | "pca"
    evidence: np.ndarray | None = None  # (6,) the object's own log-probabilities (auto only)

    def to_payload(self) -> dict:
        out = {"up": self.up, "source": self.source,
               "rotation": [[round(float(x), 6) for x in row] for row in self.rotation]}
        if self.evidence is not None:  # kept so a later sync or a query recomputes the consensus
            out["evidence"] = [round(float(x), 4) for x in self.evidence]
            out["model"] = EVIDENCE_MODEL
        return out


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


#: The six candidate up directions, in the order of every evidence vector.
DIRECTIONS = ("x", "-x", "y", "-y", "z", "-z")
FEATURES = ("base", "top", "stable", "com", "asym", "slab", "iso")
SAMPLES = 3000  # surface samples for the symmetry and slab measurements (fixed seed: deterministic)
SLAB = 0.08  # bottom/top slab thickness, fraction of the extent along the direction
BASE_DEGREES = 10.0  # hull faces within this angle of straight down form the base
# Fitted by `python benchmarks/orientation.py --fit` on all labelled LPSB classes (see its output and
# the README's up-axis table; held-out figures come from fits on half the classes). The object's
# extent along the axis was tried and dropped: it encodes the labelled classes' proportions (tall
# people and vases), not orientation, and did not help on held-out classes.
FEATURE_MEAN = np.array([0.0448, 0.0448, 0.4436, 0.5, 0.09415, 0, 0.384])
FEATURE_STD = np.array([0.07164, 0.07164, 0.4968, 0.08942, 0.06184, 0.2767, 0.2768])
WEIGHTS = np.array([0.4475, -0.3622, 0.5529, 0.8033, 0.9893, 0.5257, 0.8337])
PRIOR_FLOOR = 0.01  # no direction's prior goes to zero: strong enough evidence can always win
# What is up before any shape is seen. Files are almost never stored upside down (3 of the 207
# labelled LPSB meshes; every convention in the wild is +x, +y or +z), so each negative direction
# starts at a twentieth of a positive one: the ModelNet airplane sample, whose shape alone points
# -z, then comes out +z. A format that names its up axis is believed first: glTF's spec says +Y,
# and exporters that ignore it keep a quarter of the weight on the other axes.
NEGATIVE = 0.05
CONVENTIONS: dict[str, tuple[float, ...]] = {  # file suffix -> weights in DIRECTIONS order
    "": (1.0, NEGATIVE, 1.0, NEGATIVE, 1.0, NEGATIVE),
    ".glb": (0.25, NEGATIVE, 1.0, NEGATIVE, 0.25, NEGATIVE),
    ".gltf": (0.25, NEGATIVE, 1.0, NEGATIVE, 0.25, NEGATIVE),
}
# The conventions count as this many objects in a dataset's consensus: a handful of files leans on
# them, a dataset stored upside down throughout (hundreds of objects) still finds its own majority.
CONVENTION_OBJECTS = 2.0
# The dataset decides only where it agrees: one direction holds at least half of its prior. Elsewhere
# (a mixed library) each object keeps its own shape and file conventions, which do better there: held
# out (benchmarks/orientation.py splits) LPSB as shipped 0.67 with this rule against 0.64 with the
# dataset's prior always, a random x/y/z library 0.67 against 0.57; consistent data 0.88 against 0.89.
AGREEMENT = 0.5
# An object's evidence counts a quarter as much as the dataset's prior, in the EM as when it chooses:
# the fitted model is over-confident on classes it has not seen (held-out accuracy 0.45 against 0.63
# in sample). Held out (benchmarks/orientation.py splits), a mixed / a consistent +axis dataset:
# weight 0.25 -> 0.64 / 0.89; 0.5 -> 0.61 / 0.78; the full weight in the EM (as before) 0.60 / 0.80.
EVIDENCE_WEIGHT = 0.25
EM_ROUNDS = 20
# Which measurements and weights made a stored evidence: a sync measures again the stored objects whose
# evidence another model made, so one dataset's consensus never mixes two models' numbers.
EVIDENCE_MODEL = hashlib.sha256(repr((FEATURES, SAMPLES, SLAB, BASE_DEGREES, FEATURE_MEAN.tolist(),
                                      FEATURE_STD.tolist(), WEIGHTS.tolist())).encode()).hexdigest()[:12]


def _sign(direction: str) -> tuple[int, float]:
    return "xyz".index(direction[-1]), (-1.0 if direction.startswith("-") else 1.0)


def _area2(points: np.ndarray) -> float:
    """Area of the 2D convex hull (0 for fewer than 3 points or a degenerate set)."""
    from scipy.spatial import ConvexHull
    from scipy.spatial import QhullError

    if len(points) < 3:
        return 0.0
    try:
        return float(ConvexHull(points).volume)
    except (QhullError, ValueError):
        return 0.0


def surface_samples(mesh: Mesh, n: int = SAMPLES) -> np.ndarray:
    """n points uniformly on the surface (area-weighted), from a fixed seed."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    tri = v[mesh.faces]
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(areas), n, p=areas / areas.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    t = tri[pick]
    return t[:, 0] * (1 - s)[:, None] + t[:, 1] * (s * (1 - r2))[:, None] + t[:, 2] * (s * r2)[:, None]


def features(mesh: Mesh) -> np.ndarray:
    """(6, len(FEATURES)) raw measurements, one row per candidate up direction (DIRECTIONS order)."""
    from scipy.spatial import ConvexHull, cKDTree
    from scipy.spatial import QhullError

    v = np.asarray(mesh.vertices, dtype=np.float64)
    points = surface_samples(mesh)
    centroid = points.mean(axis=0)
    cov = np.cov((points - centroid).T)
    try:
        hull = ConvexHull(v)
        normals, tri = hull.equations[:, :3], v[hull.simplices]
    except (QhullError, ValueError):  # flat or degenerate: no volume, no base
        normals, tri = np.zeros((0, 3)), np.zeros((0, 3, 3))
    hull_area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = max(float(hull_area.sum()), 1e-12)
    tree = cKDTree(points)
    centre = (points.max(axis=0) + points.min(axis=0)) / 2
    per_axis = [_axis_measures(points, tree, centre, cov, axis) for axis in range(3)]  # shared by +a and -a
    out = np.zeros((len(DIRECTIONS), len(FEATURES)))
    base = {}
    for row, direction in enumerate(DIRECTIONS):
        axis, sign = _sign(direction)
        down = np.zeros(3)
        down[axis] = -sign
        faces = normals @ down > np.cos(np.radians(BASE_DEGREES))
        base[direction] = float(hull_area[faces].sum()) / total
        stable = _inside_any(centroid, tri[faces], axis)
        h = sign * points[:, axis]
        lo, hi = float(h.min()), float(h.max())
        extent = max(hi - lo, 1e-12)
        low_end, high_end, full, asym, iso = per_axis[axis]
        slab = (low_end - high_end) / full if sign > 0 else (high_end - low_end) / full
        out[row] = [base[direction], 0.0, stable, (sign * centroid[axis] - lo) / extent, asym, slab, iso]
    for row, direction in enumerate(DIRECTIONS):  # the opposite direction's base is this one's top
        out[row, 1] = base[direction[1:] if direction.startswith("-") else "-" + direction]
    return out


def _axis_measures(points: np.ndarray, tree, centre: np.ndarray, cov: np.ndarray,
                   axis: int) -> tuple[float, float, float, float, float]:
    """What +axis and -axis share (half the work of features): the plan areas of the low and the high
    end slabs, the whole plan area, the mirror asymmetry across the mid-plane and the plan's roundness."""
    h = points[:, axis]
    lo, hi = float(h.min()), float(h.max())
    extent = max(hi - lo, 1e-12)
    flat = [i for i in range(3) if i != axis]
    full = max(_area2(points[:, flat]), 1e-12)
    low_end = _area2(points[h < lo + SLAB * extent][:, flat])
    high_end = _area2(points[h > hi - SLAB * extent][:, flat])
    mirrored = points.copy()
    mirrored[:, axis] = 2 * centre[axis] - mirrored[:, axis]
    asym = float(tree.query(mirrored)[0].mean())
    spread = np.linalg.eigvalsh(cov[np.ix_(flat, flat)])  # ascending
    iso = float(spread[0] / max(spread[1], 1e-12))  # 1: round in plan (a vase, a cup), 0: a line
    return low_end, high_end, full, asym, iso


def _inside_any(point: np.ndarray, triangles: np.ndarray, axis: int) -> float:
    """1.0 when the point, projected along axis, falls inside one of the (projected) triangles."""
    if len(triangles) == 0:
        return 0.0
    flat = [i for i in range(3) if i != axis]
    t, p = triangles[:, :, flat], point[flat]
    a, b, c = t[:, 0], t[:, 1], t[:, 2]
    v0, v1, v2 = c - a, b - a, p - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = d00 * d11 - d01 * d01
    ok = den > 1e-15
    with np.errstate(invalid="ignore", divide="ignore"):  # degenerate triangles: NaN, masked by ok
        l1 = (d11 * d20 - d01 * d21) / den
        l2 = (d00 * d21 - d01 * d20) / den
        return float(np.any(ok & (l1 >= 0) & (l2 >= 0) & (l1 + l2 <= 1)))


def log_softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))


def evidence(mesh: Mesh, weights: np.ndarray = WEIGHTS) -> np.ndarray:
    """(6,) log-probability that each direction is up, from the object alone."""
    return log_softmax(((features(mesh) - FEATURE_MEAN) / FEATURE_STD) @ weights)


@dataclass(frozen=True)
class Consensus:
    """A dataset's prior over the six up directions, estimated from its objects' evidence."""

    prior: np.ndarray  # (6,), sums to 1
    objects: int

    @property
    def majority(self) -> str | None:
        """The direction the dataset agrees on: one that holds at least AGREEMENT of the prior, over two
        or more objects; None for a mixed library (and a lone file), where each object decides."""
        best = int(np.argmax(self.prior))
        return DIRECTIONS[best] if self.objects > 1 and self.prior[best] >= AGREEMENT else None

    def choose(self, object_evidence: np.ndarray, suffix: str = "") -> tuple[str, str]:
        """(direction, source) for one object: "dataset" when it takes the dataset's majority, "object"
        when its own shape and its file's conventions (the prior where the dataset does not agree)
        decided. Exact ties go to +y, which leaves the file as it is."""
        prior = self.prior if self.majority else convention_prior(suffix)
        scores = np.log(prior) + EVIDENCE_WEIGHT * np.asarray(object_evidence, dtype=np.float64)
        best = DIRECTIONS[max(range(len(DIRECTIONS)), key=lambda i: (scores[i], DIRECTIONS[i] == "y"))]
        return best, "dataset" if best == self.majority else "object"

    def to_payload(self) -> dict:
        return {"majority": self.majority, "objects": self.objects,
                "prior": {d: round(float(p), 4) for d, p in zip(DIRECTIONS, self.prior)}}


def valid_evidence(row: object) -> bool:
    """Six finite log-probabilities: what a stored "pose" evidence must be before it may vote."""
    try:
        values = np.asarray(row, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return values.shape == (len(DIRECTIONS),) and bool(np.isfinite(values).all())


def convention_prior(suffix: str = "") -> np.ndarray:
    """(6,) the prior over up directions for a file with this suffix (".glb", ".off", ...)."""
    weights = np.asarray(CONVENTIONS.get(suffix.lower(), CONVENTIONS[""]), dtype=np.float64)
    return weights / weights.sum()


def consensus(evidences: list[np.ndarray] | np.ndarray, suffixes: list[str] | None = None) -> Consensus:
    """EM for the dataset's prior (a MAP estimate): start from the files' conventions, alternate
    per-object posteriors and their sum plus the conventions counted as CONVENTION_OBJECTS objects. A
    floor keeps every direction possible. One object (or none) gets its file's convention prior."""
    suffixes = suffixes if suffixes is not None else [""] * len(evidences)
    kept = [(e, sfx) for e, sfx in zip(evidences, suffixes) if valid_evidence(e)]  # one NaN row would poison all
    ev = np.array([e for e, _ in kept], dtype=np.float64).reshape(-1, len(DIRECTIONS))
    suffixes = [sfx for _, sfx in kept]
    base = np.mean([convention_prior(s) for s in suffixes], axis=0) if len(ev) else convention_prior()
    prior = base
    if len(ev) > 1:
        for _ in range(EM_ROUNDS):
            post = np.exp(log_softmax(np.log(prior) + EVIDENCE_WEIGHT * ev))  # as Consensus.choose weighs it
            prior = (post.sum(axis=0) + CONVENTION_OBJECTS * base) / (len(ev) + CONVENTION_OBJECTS)
            prior = (prior + PRIOR_FLOOR) / (1 + len(DIRECTIONS) * PRIOR_FLOOR)
    return Consensus(prior, len(ev))


@dataclass(frozen=True)
class DatasetUp:
    """A dataset's consensus, one per file format: files of one format usually come from one exporter
    and share its convention (STL z-up, glTF y-up), so a library mixing formats does not make each
    format follow the other's majority. A dataset of one format is one consensus, as before."""

    formats: dict[str, Consensus]  # lower-case suffix -> the consensus of that format's objects

    def choose(self, object_evidence: np.ndarray, suffix: str = "") -> tuple[str, str]:
        """(direction, source) by the consensus of the object's format (alone if the format is new)."""
        group = self.formats.get(suffix.lower()) or consensus([object_evidence], [suffix])
        return group.choose(object_evidence, suffix)

    def majority_of(self, suffix: str) -> str | None:
        group = self.formats.get(suffix.lower())
        return group.majority if group else None

    def to_payload(self) -> dict:
        """The summary's view: the whole dataset's prior, each format's own majority when there are several."""
        groups = list(self.formats.values())
        objects = sum(g.objects for g in groups)
        prior = sum(g.prior * g.objects for g in groups) / max(objects, 1) if groups else convention_prior()
        out = {"majority": groups[0].majority if len(groups) == 1 else None, "objects": objects,
               "prior": {d: round(float(p), 4) for d, p in zip(DIRECTIONS, prior)}}
        if len(groups) > 1:
            out["formats"] = {sfx: {"majority": g.majority, "objects": g.objects} for sfx, g in self.formats.items()}
        return out


def dataset_up(evidences: list, suffixes: list[str]) -> DatasetUp:
    """The consensus of each file format among these objects (evidence rows with their file suffixes)."""
    by_format: dict[str, list] = {}
    for ev, suffix in zip(evidences, suffixes):
        by_format.setdefault(suffix.lower(), []).append(ev)
    return DatasetUp({sfx: consensus(rows, [sfx] * len(rows)) for sfx, rows in sorted(by_format.items())})


def pose(mesh: Mesh, view: ViewSettings, dataset: DatasetUp | None = None,
         object_evidence: np.ndarray | None = None, suffix: str = "") -> Pose:
    """The pose the view settings ask for, for one mesh; with ``up="auto"`` the dataset's consensus
    (None: the mesh's own evidence and its file format's convention) and the mesh's evidence
    (computed when not given)."""
    if view.align == "pca":
        return Pose(pca_rotation(mesh), "pca", "pca")
    if view.up != "auto":
        return Pose(AXIS_ROTATIONS[view.up], view.up, "given")
    ev = evidence(mesh) if object_evidence is None else object_evidence
    up, source = (dataset or consensus([ev], [suffix])).choose(ev, suffix)
    return Pose(AXIS_ROTATIONS[up], up, source, ev)


@dataclass(frozen=True)
class Decision:
    """An auto up decided in the plan for one object: what its render stage applies and records."""

    up: str
    source: str  # "object" | "dataset"
    evidence: tuple[float, ...]

    def pose(self) -> Pose:
        return Pose(AXIS_ROTATIONS[self.up], self.up, self.source, np.asarray(self.evidence))


def measure(path: Path, max_faces: int) -> np.ndarray | None:
    """The evidence of one file, or None when it cannot be read (the render stage then says why)."""
    from .meshio import load_mesh

    try:
        return evidence(load_mesh(path, max_faces=max_faces))
    except Exception:  # noqa: BLE001 - any failure is reported by the render stage, with its reason
        return None


def measure_files(paths: list[Path], max_faces: int, workers: int) -> list[np.ndarray | None]:
    """Evidence of many files, in `workers` spawned processes (0: in this one). No GL is involved."""
    if workers == 0 or len(paths) < 2:
        return [measure(p, max_faces) for p in paths]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(partial(measure, max_faces=max_faces), paths, chunksize=8))


def stored_consensus(payloads: Iterable[dict]) -> DatasetUp | None:
    """The consensus of stored objects, from the evidence their "pose" payloads kept and the suffix of
    their "path" (None if no payload kept evidence)."""
    found = [(p["pose"]["evidence"], Path(p.get("path") or "").suffix) for p in payloads
             if valid_evidence((p.get("pose") or {}).get("evidence"))]
    return dataset_up([e for e, _ in found], [s for _, s in found]) if found else None
