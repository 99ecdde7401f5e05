"""Duplicates in a collection, confirmed on the meshes: exact copies (same bytes), the same geometry
(re-saved, converted, re-ordered, re-meshed, turned or scaled) and near copies (small edits), grouped,
with how many test objects have a copy in train (benchmark contamination).

Two stages. The embedding only proposes: each object's top-k neighbours in one or more collections
(and, if asked, every neighbour above a loose cosine), by FAISS on the collection's exact index, the
only all-pairs step. Geometry decides (m3d.geometry): each proposed pair's meshes are aligned and
their surfaces measured against each other, so two look-alike chairs at cosine 0.994 stay apart and a
file exported twice is paired whatever its cosine. Objects with the same content hash are one exact
group without any geometry; only one mesh per content is loaded, once, however many pairs it is in.

Read-only by design: nothing here deletes, moves or rewrites anything. Duplicate lists are for a
person to review (the report shows each pair's views side by side after alignment), never for bulk
deletion. Groups are connected components of the confirmed pairs.
"""

from __future__ import annotations

import csv
import json
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import M3DError, UsageError, spreadsheet_cell
from .geometry import SAMPLES, Match, Shape
from .store import Session

#: Near copies: the Hausdorff distance of the aligned surfaces (the farthest any sample of either lies
#: from the other surface), relative to the unit radius, at or below this. 0.01 = 1% of the radius.
#: Measured (benchmarks/RESULTS.md, issue 20): planted copies jittered by 1e-3 of the size reach 0.0037;
#: the closest different objects measured were 0.055 apart on PSB-train and 0.024 on LPSB's fish, while
#: LPSB's Glasses 50/54/57 (one frame with tiny edits) are 0.004-0.015 apart: two of their pairs are near.
DEFAULT_NEAR = 0.01
#: Same geometry: Hausdorff at or below this fraction of the sample spacing sqrt(area / samples), so
#: the bound follows each mesh's own sampling density. Equal surfaces measure 1e-8 to 2e-5 of the radius
#: (float32 and 7-digit text files round coordinates; more when a small part sits far from the origin);
#: a jitter of 1e-4 of the size already moves the surface by 2e-4. 0.003 spacing is 6e-5 to 1.4e-4 on
#: LPSB's meshes at 4,000 samples: a difference no sample spacing can show, between the two.
SAME_FRACTION = 0.003
GIVE_UP_SPACINGS = 1.5  # two samplings of one surface are 0.5 spacing apart on average (geometry.Shape)
DEFAULT_CANDIDATES = 5  # neighbours proposed per object and collection
SHAPE_CACHE = 512  # prepared meshes kept in memory (pairs are visited in row order: each loads once)
PAYLOAD = ["path", "dataset", "class", "split", "content_hash", "pose"]  # pose: re-render as stored
TRAIN, TEST = "train", "test"
GEOMETRY_NEEDS = "m3d dedup measures surfaces with open3d's ray-casting scene: pip install 'm3d[raycast]'"
KINDS = ("exact", "same-geometry", "near")  # tightest first; a group is as loose as its loosest pair


@dataclass(frozen=True)
class DedupOptions:
    collections: tuple[str, ...] = ()  # proposing collections (default: the first mean-pooled one)
    candidates: int = DEFAULT_CANDIDATES  # top-k neighbours per object proposed for geometry
    min_cosine: float | None = None  # also every neighbour at or above this cosine
    near: float = DEFAULT_NEAR  # Hausdorff bound of a near copy, relative to the unit radius
    samples: int = SAMPLES  # surface samples per mesh

    def __post_init__(self) -> None:
        if self.candidates < 0:
            raise UsageError(f"--candidates must be 0 or more, got {self.candidates}")
        if self.min_cosine is not None and not (-1.0 <= self.min_cosine <= 1.0):
            raise UsageError(f"--min-cosine must be a cosine in [-1, 1], got {self.min_cosine}")
        if not self.candidates and self.min_cosine is None:
            raise UsageError("nothing would be proposed: give --candidates above 0 or a --min-cosine")
        if not (0.0 < self.near < 1.0):
            raise UsageError(f"--near must be a fraction of the radius in (0, 1), got {self.near}")
        if not (100 <= self.samples <= 1_000_000):
            raise UsageError(f"--samples must be between 100 and 1000000, got {self.samples}")


@dataclass
class Member:
    id: str
    path: str
    dataset: str
    label: str
    split: str | None
    content_hash: str
    pose: dict | None = None  # the rotation it was rendered with (the report re-renders with it)


@dataclass
class Pair:
    """One confirmed pair of member rows and why: its kind, the geometry that decided it (None for
    exact copies: same bytes need no measuring) and the best cosine that proposed it."""

    a: int
    b: int
    kind: str
    match: Match | None = None
    cosine: float | None = None
    proposed_by: str | None = None

    def why(self, options: DedupOptions) -> str:
        if self.kind == "exact":
            return "exact: the two files have the same bytes (content hash)"
        m = self.match
        bound = (f"same-geometry bound {m.spacing * SAME_FRACTION:.1e} = {SAME_FRACTION:g} x sample spacing "
                 f"{m.spacing:.3g}" if self.kind == "same-geometry" else f"near bound {options.near:g}")
        return (f"{self.kind}: after turning the second by {m.angle:.1f} degrees onto the first, no surface sample "
                f"of either lies farther than {m.hausdorff:.2e} of the radius from the other surface ({bound}); "
                f"mean {m.chamfer:.2e}; proposed by {self.proposed_by} at cosine {self.cosine:.5f}")


@dataclass
class Group:
    kind: str  # the loosest kind among its pairs
    members: list[Member]
    pairs: list[Pair]  # member indices local to the group

    @property
    def classes(self) -> list[str]:
        return sorted({m.label for m in self.members})

    @property
    def places(self) -> list[str]:
        """Each member's path, with its dataset when the group spans several (both may hold Cup/21.off)."""
        several = len({m.dataset for m in self.members}) > 1
        return [f"{m.dataset}:{m.path}" if several else m.path for m in self.members]

    @property
    def hausdorff(self) -> float:
        """The largest surface distance among the group's measured pairs (0 for byte copies only)."""
        return max((p.match.hausdorff for p in self.pairs if p.match), default=0.0)


@dataclass
class Checked:
    """One proposed pair as geometry measured it (confirmed or not): the report's scatter of cosine
    against surface distance, and the audit of what was rejected."""

    a: str  # paths
    b: str
    cosine: float
    hausdorff: float | None  # None: could not be measured (see problem)
    chamfer: float | None
    spacing: float | None
    kind: str | None  # None: rejected
    problem: str | None = None


@dataclass
class DedupResult:
    collections: list[str]
    options: DedupOptions
    objects: int
    groups: list[Group]
    checked: list[Checked] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)  # seconds and counts of each stage
    test_objects: int = 0
    contaminated: list[str] = field(default_factory=list)  # ids of test objects with a confirmed copy in train
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> {"test", "contaminated"}

    def of_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def pairs(self) -> list[tuple[Member, Member, Pair]]:
        return [(g.members[p.a], g.members[p.b], p) for g in self.groups for p in g.pairs]

    def summary(self) -> dict:
        counts = {}
        for kind in KINDS:
            groups = self.of_kind(kind)
            counts[f"{kind}_groups"] = len(groups)
            counts[f"{kind}_objects"] = sum(len(g.members) for g in groups)
        return {"collections": self.collections, "near": self.options.near, "same_fraction": SAME_FRACTION,
                "candidates": self.options.candidates, "min_cosine": self.options.min_cosine,
                "samples": self.options.samples, "objects": self.objects, **counts,
                "confirmed_pairs": sum(len(g.pairs) for g in self.groups), "cost": self.cost,
                "test_objects": self.test_objects, "contaminated_test_objects": len(self.contaminated),
                "per_class": self.per_class}

    def to_json(self) -> dict:
        return {**self.summary(), "groups": [_group_json(g, self.options) for g in self.groups],
                "rejected": [vars(c) for c in self.checked if c.kind is None]}


def _group_json(group: Group, options: DedupOptions) -> dict:
    members = [vars(m) for m in group.members]
    pairs = []
    for p in group.pairs:
        row = {"a": group.members[p.a].path, "b": group.members[p.b].path, "kind": p.kind, "why": p.why(options)}
        if p.match is not None:
            row.update({"cosine": round(p.cosine, 6), "proposed_by": p.proposed_by, **p.match.to_json()})
        pairs.append(row)
    return {"kind": group.kind, "members": members, "pairs": pairs}


class _Components:
    """Union-find over row indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def propose(vectors: np.ndarray, k: int, min_cosine: float | None = None) -> dict[tuple[int, int], float]:
    """Candidate pairs (i < j) -> cosine: each row's k nearest other rows, and every pair at or above
    min_cosine (FAISS range search on unit vectors; range_search keeps scores strictly above its radius,
    so it is nudged down for "at or above")."""
    import faiss

    n = len(vectors)
    pairs: dict[tuple[int, int], float] = {}
    if n < 2:
        return pairs
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)

    def add(i: int, j: int, s: float) -> None:
        if i != j:
            key = (min(i, j), max(i, j))
            pairs[key] = max(pairs.get(key, -2.0), min(float(s), 1.0))

    if k:
        scores, rows = index.search(vectors, min(k + 1, n))
        for i in range(n):
            for s, j in zip(scores[i], rows[i]):
                if j >= 0:
                    add(i, int(j), s)
    if min_cosine is not None:
        lims, scores, rows = index.range_search(vectors, float(np.nextafter(np.float32(min_cosine), np.float32(-2))))
        for i in range(n):
            for s, j in zip(scores[lims[i]:lims[i + 1]], rows[lims[i]:lims[i + 1]]):
                add(i, int(j), s)
    return pairs


def classify(match: Match, near: float) -> str | None:
    """The kind a measured pair gets, None when it is no duplicate."""
    if match.hausdorff <= SAME_FRACTION * match.spacing:
        return "same-geometry"
    return "near" if match.hausdorff <= near else None


class _Shapes:
    """Prepared meshes by row, loaded once each (a bounded cache; pairs come in row order)."""

    def __init__(self, session: Session, members: list[Member], samples: int) -> None:
        self.session, self.members, self.samples = session, members, samples
        self.cache: OrderedDict[int, Shape | str] = OrderedDict()
        self.loads = 0
        self.seconds = 0.0  # reading and preparing meshes

    def get(self, row: int) -> Shape | str:
        """The row's shape, or why it has none."""
        from .geometry import prepare
        from .meshio import load_mesh

        if row in self.cache:
            self.cache.move_to_end(row)
            return self.cache[row]
        start = time.perf_counter()
        m = self.members[row]
        path = self.session.source_path({"path": m.path, "dataset": m.dataset})
        if path is None or not path.is_file():
            shape: Shape | str = "source not available" + (f" ({path})" if path else "")
        else:
            try:
                shape = prepare(load_mesh(path), self.samples)
                self.loads += 1
            except (M3DError, OSError) as exc:
                shape = f"cannot read: {exc}"
        self.cache[row] = shape
        self.seconds += time.perf_counter() - start
        if len(self.cache) > SHAPE_CACHE:
            self.cache.popitem(last=False)
        return shape


def _members(session: Session, name: str) -> tuple[list[Member], np.ndarray]:
    """A collection's objects and one unit vector each to propose from: a views collection's (one
    multivector per object) is the mean of its stored view vectors."""
    index = session.exact(name)
    payloads = {r.id: r.payload for r in session.vectors.records(name, fields=PAYLOAD)}
    members = [Member(pid, str(payloads[pid].get("path")), str(payloads[pid].get("dataset")),
                      str(payloads[pid].get("class")), payloads[pid].get("split"),
                      str(payloads[pid].get("content_hash")), payloads[pid].get("pose")) for pid in index.ids]
    vectors = np.asarray(index.vectors, dtype=np.float32)
    if index.views > 1:
        vectors = vectors.reshape(len(vectors), index.views, -1).mean(axis=1)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return members, np.ascontiguousarray(vectors)


def find_duplicates(session: Session, options: DedupOptions) -> DedupResult:
    """Confirmed duplicate groups of the objects of the first proposing collection (across every
    dataset synced into it), with the pairs geometry rejected and the cost of each stage."""
    from .geometry import compare
    from .search import choose_collection

    names = list(dict.fromkeys(options.collections)) or [choose_collection(session, None)]
    for name in names:
        session.require(name)
    start = time.perf_counter()
    members, first_vectors = _members(session, names[0])
    row_of = {m.id: r for r, m in enumerate(members)}

    # exact copies: one representative per content, no geometry
    by_hash: dict[str, list[int]] = defaultdict(list)
    for row, m in enumerate(members):
        by_hash[m.content_hash].append(row)
    rep = {row: rows[0] for rows in by_hash.values() for row in rows}
    confirmed: list[Pair] = [Pair(rows[0], r, "exact") for rows in by_hash.values() for r in rows[1:]]

    # stage 1: proposals among representatives, from every collection
    proposed: dict[tuple[int, int], tuple[float, str]] = {}
    for name in names:
        found, vectors = (members, first_vectors) if name == names[0] else _members(session, name)
        rows = np.array([row_of.get(m.id, -1) for m in found])
        keep = np.flatnonzero((rows >= 0) & np.array([rep.get(int(r), -1) == r for r in rows]))
        for (i, j), s in propose(vectors[keep], options.candidates, options.min_cosine).items():
            a, b = sorted((int(rows[keep[i]]), int(rows[keep[j]])))
            if (a, b) not in proposed or s > proposed[(a, b)][0]:
                proposed[(a, b)] = (s, name)
    proposing = time.perf_counter() - start

    # stage 2: geometry decides
    from .render import raycast_available

    if proposed and not raycast_available():
        raise M3DError(GEOMETRY_NEEDS)
    shapes = _Shapes(session, members, options.samples)
    checked: list[Checked] = []
    start = time.perf_counter()
    for (a, b), (cosine, name) in sorted(proposed.items()):
        sa, sb = shapes.get(a), shapes.get(b)
        if isinstance(sa, str) or isinstance(sb, str):
            problem = f"{members[a].path}: {sa}" if isinstance(sa, str) else f"{members[b].path}: {sb}"
            checked.append(Checked(members[a].path, members[b].path, cosine, None, None, None, None, problem))
            continue
        # a pose whose samples are more than the bound plus 1.5 spacings apart on average cannot be within it
        match = compare(sa, sb, give_up=options.near + GIVE_UP_SPACINGS * max(sa.spacing, sb.spacing))
        kind = classify(match, options.near)
        checked.append(Checked(members[a].path, members[b].path, cosine, match.hausdorff, match.chamfer,
                               match.spacing, kind))
        if kind:
            confirmed.append(Pair(a, b, kind, match, cosine, name))
    measuring = time.perf_counter() - start

    result = DedupResult(names, options, len(members), _groups(members, confirmed), checked,
                         {"proposed_pairs": len(proposed), "measured_pairs": sum(c.hausdorff is not None for c in checked),
                          "meshes_loaded": shapes.loads, "distinct_contents": len(by_hash),
                          "propose_seconds": round(proposing, 3), "load_seconds": round(shapes.seconds, 3),
                          "geometry_seconds": round(measuring - shapes.seconds, 3)})
    _contamination(result, members, confirmed)
    return result


def _groups(members: list[Member], pairs: list[Pair]) -> list[Group]:
    comps = _Components(len(members))
    for p in pairs:
        comps.union(p.a, p.b)
    by_root: dict[int, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_root[comps.find(p.a)].append(p)
    groups = []
    for root_pairs in by_root.values():
        rows = sorted({r for p in root_pairs for r in (p.a, p.b)}, key=lambda r: (members[r].dataset, members[r].path))
        local = {r: n for n, r in enumerate(rows)}
        kind = max((p.kind for p in root_pairs), key=KINDS.index)
        local_pairs = sorted((_local(p, local) for p in root_pairs), key=lambda p: (p.a, p.b))
        groups.append(Group(kind, [members[r] for r in rows], local_pairs))
    return sorted(groups, key=lambda g: (KINDS.index(g.kind), g.hausdorff, -len(g.members), g.members[0].path))


def _local(pair: Pair, local: dict[int, int]) -> Pair:
    """The pair in group-local indices, first member first (its rotation inverted if they swap)."""
    a, b = local[pair.a], local[pair.b]
    if a < b:
        return Pair(a, b, pair.kind, pair.match, pair.cosine, pair.proposed_by)
    return Pair(b, a, pair.kind, pair.match.swapped() if pair.match else None, pair.cosine, pair.proposed_by)


def _contamination(result: DedupResult, members: list[Member], pairs: list[Pair]) -> None:
    """A test object with a confirmed copy (any kind) in train."""
    contaminated: set[int] = set()
    for p in pairs:
        for a, b in ((p.a, p.b), (p.b, p.a)):
            if members[a].split == TEST and members[b].split == TRAIN:
                contaminated.add(a)
    tests = [r for r, m in enumerate(members) if m.split == TEST]
    result.test_objects = len(tests)
    result.contaminated = sorted(members[r].id for r in contaminated)
    for r in tests:
        row = result.per_class.setdefault(members[r].label, {"test": 0, "contaminated": 0})
        row["test"] += 1
        row["contaminated"] += r in contaminated
    result.per_class = dict(sorted(result.per_class.items()))


def confirmed_pairs(result: DedupResult, ids: list[str]) -> np.ndarray:
    """(P, 2) rows of `ids` (an index's order) of every confirmed pair, each once: what
    `m3d eval --exclude-duplicates` removes from each query's ranking."""
    row = {pid: r for r, pid in enumerate(ids)}
    out = [(row[a.id], row[b.id]) for g in result.groups for a in g.members for b in g.members
           if a.id < b.id and a.id in row and b.id in row]
    return np.array(sorted(out), dtype=np.int64).reshape(-1, 2)


def write_tables(result: DedupResult, out_dir: Path) -> list[Path]:
    """dedup_pairs.csv (one row per confirmed pair: kind, group, distances, cosine, paths, classes,
    splits) and dedup.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs_csv = out_dir / "dedup_pairs.csv"
    with open(pairs_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "group", "hausdorff", "chamfer", "angle_degrees", "cosine", "path_a", "class_a",
                         "split_a", "dataset_a", "path_b", "class_b", "split_b", "dataset_b"])
        for number, group in enumerate(result.groups, 1):
            for p in group.pairs:
                a, b, m = group.members[p.a], group.members[p.b], p.match
                measured = (f"{m.hausdorff:.3e}", f"{m.chamfer:.3e}", round(m.angle, 2), round(p.cosine, 6)) if m else ("",) * 4
                writer.writerow([spreadsheet_cell(v) for v in (p.kind, number, *measured, a.path, a.label, a.split,
                                                               a.dataset, b.path, b.label, b.split, b.dataset)])
    full = out_dir / "dedup.json"
    full.write_text(json.dumps(result.to_json(), indent=2))
    return [pairs_csv, full]
