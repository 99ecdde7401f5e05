"""Duplicates in a collection: exact copies (same content hash), near copies (cosine above a
threshold), grouped, and how many test objects have a copy in train (benchmark contamination).

Read-only by design: nothing here deletes, moves or rewrites anything. Duplicate lists are for a
person to review (report page with every group's views side by side), never for bulk deletion.

Near pairs come from FAISS range search on the collection's exact index (every pair above the
threshold, not a top-k cut-off); groups are connected components of the pairs, so a chain a~b~c is
one group even when a and c are further apart (each group lists its lowest pair score).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError, spreadsheet_cell
from .store import Session

#: Cosine at or above which two objects count as near duplicates. Measured with the weight-free HOG
#: mean collection on all 380 LPSB meshes: the 7 pairs of same-geometry copies in LPSB (2 byte copies,
#: 4 with their vertices re-ordered, 1 rotated) score >= 0.99998; the closest two different meshes
#: (Mech/321 and Mech/330, a chamfer apart) 0.99896; a re-saved copy (centred, scaled, rewritten) of
#: 20 meshes >= 0.99980. 0.9995 sits between the copies and the closest variants. Deliberately
#: conservative for other encoders (it misses near copies rather than pairing different objects):
#: read the report's histogram and pass --threshold (README: choosing a threshold).
DEFAULT_THRESHOLD = 0.9995
PAYLOAD = ["path", "dataset", "class", "split", "content_hash", "pose"]  # pose: re-render as stored
TRAIN, TEST = "train", "test"


@dataclass(frozen=True)
class DedupOptions:
    collection: str | None = None  # default: the first mean-pooled collection
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not (0.0 < self.threshold <= 1.0):
            raise UsageError(f"--threshold must be a cosine in (0, 1], got {self.threshold}")


@dataclass
class Member:
    id: str
    path: str
    dataset: str
    label: str
    split: str | None
    content_hash: str


@dataclass
class Group:
    kind: str  # "exact" (same bytes) or "near" (cosine >= threshold, different bytes)
    members: list[Member]
    pairs: list[tuple[int, int, float]]  # (member index, member index, cosine), each pair once
    min_score: float
    max_score: float

    @property
    def classes(self) -> list[str]:
        return sorted({m.label for m in self.members})

    @property
    def places(self) -> list[str]:
        """Each member's path, with its dataset when the group spans several (both may hold Cup/21.off)."""
        several = len({m.dataset for m in self.members}) > 1
        return [f"{m.dataset}:{m.path}" if several else m.path for m in self.members]


@dataclass
class DedupResult:
    collection: str
    threshold: float
    objects: int
    exact: list[Group]
    near: list[Group]
    nn_similarity: list[float]  # per object: cosine to its nearest other object
    test_objects: int = 0
    contaminated: list[str] = field(default_factory=list)  # ids of test objects with a copy in train
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> {"test", "contaminated"}

    def summary(self) -> dict:
        return {"collection": self.collection, "threshold": self.threshold, "objects": self.objects,
                "exact_groups": len(self.exact), "exact_objects": sum(len(g.members) for g in self.exact),
                "near_groups": len(self.near), "near_objects": sum(len(g.members) for g in self.near),
                "test_objects": self.test_objects, "contaminated_test_objects": len(self.contaminated),
                "per_class": self.per_class}

    def to_json(self) -> dict:
        return {**self.summary(), "groups": [_group_json(g) for g in self.exact + self.near],
                "nn_similarity": [round(s, 6) for s in self.nn_similarity]}


def _group_json(group: Group) -> dict:
    data = asdict(group)
    data["pairs"] = [{"a": group.members[i].path, "b": group.members[j].path, "score": round(s, 6)}
                     for i, j, s in group.pairs]
    return data


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


def near_pairs(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Every pair of rows (i < j) whose cosine is >= threshold: FAISS range search on unit vectors."""
    import faiss

    if len(vectors) < 2:
        return []
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    # range_search keeps scores strictly above its radius: nudge it so "at or above" holds
    lims, scores, rows = index.range_search(vectors, float(np.nextafter(np.float32(threshold), np.float32(-1))))
    pairs = []
    for i in range(len(vectors)):
        for s, j in zip(scores[lims[i]:lims[i + 1]], rows[lims[i]:lims[i + 1]]):
            if j > i:
                pairs.append((i, int(j), float(min(s, 1.0))))
    return pairs


def nearest_other(vectors: np.ndarray) -> np.ndarray:
    """Per row, the cosine to its nearest other row (an exact copy counts: it scores 1)."""
    import faiss

    n = len(vectors)
    if n < 2:
        return np.zeros(n, np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, rows = index.search(vectors, 2)
    own = rows == np.arange(n)[:, None]
    # the best row that is not the row itself (with ties, FAISS may list a copy before the row)
    return np.where(own[:, 0], scores[:, 1], scores[:, 0]).astype(np.float32)


def _groups(kind: str, members: list[Member], pairs: list[tuple[int, int, float]]) -> list[Group]:
    comps = _Components(len(members))
    for i, j, _ in pairs:
        comps.union(i, j)
    by_root: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
    for pair in pairs:
        by_root[comps.find(pair[0])].append(pair)
    groups = []
    for root_pairs in by_root.values():
        rows = sorted({r for i, j, _ in root_pairs for r in (i, j)}, key=lambda r: members[r].path)
        local = {r: n for n, r in enumerate(rows)}
        scores = [s for _, _, s in root_pairs]
        groups.append(Group(kind, [members[r] for r in rows],
                            sorted((local[i], local[j], s) for i, j, s in root_pairs), min(scores), max(scores)))
    return sorted(groups, key=lambda g: (-g.max_score, -len(g.members), g.members[0].path))


def find_duplicates(session: Session, options: DedupOptions) -> DedupResult:
    """Exact and near duplicate groups, the nearest-neighbour distribution and contamination of one
    collection (its objects across every dataset synced into it)."""
    from .search import choose_collection

    name = choose_collection(session, options.collection)
    if session.vectors.views(name) is not None:
        raise UsageError(f"{name} holds every view of an object (a multivector): near duplicates are decided by one "
                         "vector per object, so name a pooled collection (--collection m3d_<encoder>_mean)")
    index = session.exact(name)
    payloads = {r.id: r.payload for r in session.vectors.records(name, fields=PAYLOAD)}
    members = [Member(pid, str(payloads[pid].get("path")), str(payloads[pid].get("dataset")),
                      str(payloads[pid].get("class")), payloads[pid].get("split"),
                      str(payloads[pid].get("content_hash"))) for pid in index.ids]
    vectors = index.vectors
    by_hash: dict[str, list[int]] = defaultdict(list)
    for row, m in enumerate(members):
        by_hash[m.content_hash].append(row)
    exact_pairs = [(rows[a], rows[b], 1.0) for rows in by_hash.values() if len(rows) > 1
                   for a in range(len(rows)) for b in range(a + 1, len(rows))]
    pairs = near_pairs(vectors, options.threshold)
    near = [(i, j, s) for i, j, s in pairs if members[i].content_hash != members[j].content_hash]
    result = DedupResult(name, options.threshold, len(members), _groups("exact", members, exact_pairs),
                         _groups("near", members, near), [float(s) for s in nearest_other(vectors)])

    # contamination: a test object with an exact or near copy in train
    contaminated: set[int] = set()
    for i, j, _ in exact_pairs + near:
        for a, b in ((i, j), (j, i)):
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
    return result


def write_tables(result: DedupResult, out_dir: Path) -> list[Path]:
    """dedup_pairs.csv (one row per pair: kind, group, paths, classes, splits, score) and dedup.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs_csv = out_dir / "dedup_pairs.csv"
    with open(pairs_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "group", "score", "path_a", "class_a", "split_a", "dataset_a",
                         "path_b", "class_b", "split_b", "dataset_b"])
        for number, group in enumerate(result.exact + result.near, 1):
            for i, j, score in group.pairs:
                a, b = group.members[i], group.members[j]
                writer.writerow([spreadsheet_cell(v) for v in (group.kind, number, round(score, 6), a.path, a.label,
                                                               a.split, a.dataset, b.path, b.label, b.split, b.dataset)])
    full = out_dir / "dedup.json"
    full.write_text(json.dumps(result.to_json(), indent=2))
    return [pairs_csv, full]
