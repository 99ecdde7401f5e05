"""Retrieval quality per collection (the reference protocol) and Qdrant-vs-FAISS agreement.

Every object queries its collection; its own point is excluded by id. precision@k is the fraction of
the k nearest that share the query's class; mAP ranks the whole collection; NN, FT, ST and DCG are the
Princeton Shape Benchmark's measures (Shilane et al. 2004; see ``score_queries``); recall@k compares
Qdrant's answers, as configured (HNSW graph, quantization, search-time ef), with FAISS's exact ones for
the same query vectors. A collection without an HNSW graph is searched exactly by Qdrant too: its
recall says only that both engines hold the same rows, and the table says so. A query whose class has
no other member cannot be answered right: it is left out of every quality metric (p@k, NN, mAP, per
class) and counted in ``excluded``, so one convention holds everywhere. A views collection (one
multivector per object) ranks by exact MaxSim (m3d.maxsim) and its recall compares Qdrant's native
MaxSim answers with that exact one.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .connector import SearchSettings
from .errors import StoreError, UsageError, spreadsheet_cell
from .maxsim import scores
from .store import Session

PRECISION_AT = (5, 10)
CHUNK = 1024
TIE_EPS = 1e-5


@dataclass
class CollectionEval:
    collection: str
    objects: int
    classes: int
    precision: dict[int, float]  # k -> mean precision@k (over min(k, objects - 1) neighbours)
    map: float
    nn_accuracy: float
    first_tier: float
    second_tier: float
    dcg: float
    per_class: dict[str, dict[str, float]]  # class -> {"objects", "p@5", "p@10", "map"}; scored classes only
    recall_k: int
    recall: float  # mean recall@k of Qdrant (first search setting) against FAISS
    recall_queries: int
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # engine -> p50/p95/p99
    excluded: int = 0  # queries left out of the quality metrics: no other member of their class
    # with --exclude-duplicates: the same figures with each query's confirmed duplicates (m3d dedup's
    # groups, decided on the meshes) removed from its ranking ({"pairs", "p@5", "p@10", "map", "nn_acc"})
    deduplicated: dict[str, float] | None = None
    index: str = ""  # Qdrant's index as built: "none (exact scan)" or "hnsw m=16 ef_construct=100 ..."
    indexed: int = 0  # vectors in an HNSW graph; 0 = Qdrant searched exactly
    sweep: list[dict] = field(default_factory=list)  # per search setting: hnsw_ef, recall, p50/p95/p99 ms

    def row(self) -> dict:
        row = {"collection": self.collection, "objects": self.objects, "classes": self.classes}
        row.update({f"p@{k}": round(v, 4) for k, v in self.precision.items()})
        row.update({"map": round(self.map, 4), "nn_acc": round(self.nn_accuracy, 4), "ft": round(self.first_tier, 4),
                    "st": round(self.second_tier, 4), "dcg": round(self.dcg, 4), "excluded": self.excluded,
                    "qdrant index": self.index})
        for point in self.sweep if len(self.sweep) > 1 else self.sweep[:1] or [{"recall": self.recall}]:
            key = f"recall@{self.recall_k}" + (f" ef={point['hnsw_ef']}" if len(self.sweep) > 1 else "")
            row[key] = self.shown_recall(point["recall"])
        if self.deduplicated is not None:
            d = self.deduplicated
            row.update({"dup_pairs": int(d["pairs"]), **{f"dedup_p@{k}": round(d[f"p@{k}"], 4) for k in PRECISION_AT},
                        "dedup_map": round(d["map"], 4), "dedup_nn_acc": round(d["nn_acc"], 4)})
        return row

    def shown_recall(self, recall: float) -> float | str:
        """Without an HNSW graph both engines search exactly: a perfect score is no finding, say so.
        Anything less is shown as it is (then the two engines disagree about the rows)."""
        return "exact (no index)" if not self.indexed and recall >= 1.0 else round(recall, 4)


METRICS = ("ap", "nn", "ft", "st", "dcg", "scored")


def ranking_metrics(vectors: np.ndarray, labels: np.ndarray, ks=PRECISION_AT, *,
                    exclude: np.ndarray | None = None, views: int = 1) -> dict:
    """precision@k, AP, NN, FT, ST and DCG for every row against all others (self excluded),
    computed exactly on unit vectors in chunks so memory stays bounded. Rows whose label no other row
    shares get NaN everywhere and False in "scored": callers average over the scored rows only.
    exclude: (P, 2) row pairs (each other's duplicates) removed from each other's rankings, as a
    query's own point is. views > 1: rows are flat multivectors, ranked by MaxSim."""
    n = len(vectors)
    if exclude is not None and len(exclude):
        exclude = np.concatenate([exclude, exclude[:, ::-1]])
    parts = []
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        sims = scores(vectors[lo:hi], vectors, views)
        sims[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # never your own neighbour
        if exclude is not None and len(exclude):
            mine = exclude[(exclude[:, 0] >= lo) & (exclude[:, 0] < hi)]
            sims[mine[:, 0] - lo, mine[:, 1]] = -np.inf
        parts.append(score_queries(sims, labels[lo:hi], labels, ks))
    return {"precision": {k: np.concatenate([p["precision"][k] for p in parts]) for k in ks},
            **{key: np.concatenate([p[key] for p in parts]) for key in METRICS}}


def score_queries(sims: np.ndarray, query_labels: np.ndarray, labels: np.ndarray, ks=PRECISION_AT) -> dict:
    """Per query row of sims (queries x collection), where each query's own point is already -inf:
    precision@k, AP, and the Princeton Shape Benchmark's measures. With R the query's relevant
    candidates (its class less itself, C-1 for a class of C): NN = whether the first result is relevant,
    FT (first tier) = the share of R within the first R results, ST (second tier) = within the first
    2R, DCG = sum of G_i / log2(i) over the whole ranking (G_i = 1 for a relevant i-th result, the
    first counted as 1) divided by the same sum for the ideal ranking (all R first). NaN (and scored
    False) for a query with no other member of its class."""
    n = sims.shape[1]
    max_k = min(max(ks), n - 1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, : n - 1]
    # candidates removed from a ranking (-inf: near duplicates) rank last and must count as nothing
    relevant = (labels[order] == query_labels[:, None]) & (np.take_along_axis(sims, order, axis=1) > -np.inf)
    totals = relevant.sum(axis=1)
    lone = totals == 0
    precision = {}
    for k in ks:
        p = relevant[:, : min(k, max_k)].mean(axis=1) if max_k else np.full(len(sims), np.nan)
        precision[k] = np.where(lone, np.nan, p)
    nn = np.where(lone, np.nan, relevant[:, 0]) if n > 1 else np.full(len(sims), np.nan)
    hits = np.cumsum(relevant, axis=1)
    rows = np.arange(len(sims))
    discount = 1.0 / np.maximum(1.0, np.log2(np.arange(1, n)))  # rank 1 counts 1, rank i counts 1/log2(i)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])  # ideal[r]: DCG of r relevant results first
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (relevant * hits / np.arange(1, n)).sum(axis=1) / totals
        ft = hits[rows, np.clip(totals - 1, 0, None)] / totals if n > 1 else np.full(len(sims), np.nan)
        st = hits[rows, np.clip(2 * totals - 1, 0, n - 2)] / totals if n > 1 else np.full(len(sims), np.nan)
        dcg = (relevant * discount).sum(axis=1) / ideal[totals]
    return {"precision": precision, "ap": ap, "nn": nn, "scored": np.isfinite(ap),
            **{key: np.where(lone, np.nan, value) for key, value in (("ft", ft), ("st", st), ("dcg", dcg))}}


def _mean(values: np.ndarray) -> float:
    """Mean over the scored (finite) entries; 0.0 when none is."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else 0.0


def evaluate_collection(session: Session, name: str, *, recall_k: int = 10, recall_queries: int = 1000,
                        latency_queries: int = 100, exclude_duplicates: bool = False,
                        search: tuple[SearchSettings, ...] = (SearchSettings(),)) -> CollectionEval:
    """Quality from the exact index; then Qdrant against FAISS for each search setting (an ef sweep)."""
    index = session.exact(name)
    damaged = _damaged_rows(index.vectors, index.views)
    if damaged:  # NaN or huge floats would rank as noise and leave FAISS answers empty
        raise StoreError(f"collection {name} holds {damaged} damaged vectors (not unit length): `m3d sync` embeds "
                         "them again (`m3d check` counts them)")
    labels_by_id = {rec.id: rec.payload.get("class") for rec in session.vectors.records(name, fields=["class"])}
    ids = index.ids
    labels = np.array([str(labels_by_id.get(i)) for i in ids])
    metrics = ranking_metrics(index.vectors, labels, views=index.views)
    scored = metrics["scored"]
    per_class = {}
    for label in sorted(set(labels[scored])):
        mask = labels == label
        per_class[label] = {"objects": int(mask.sum()),
                            **{f"p@{k}": _mean(metrics["precision"][k][mask]) for k in PRECISION_AT},
                            "map": _mean(metrics["ap"][mask])}

    sample = np.linspace(0, len(ids) - 1, num=min(recall_queries, len(ids)), dtype=int) if ids else np.array([], int)
    queries = index.vectors[sample]
    views = session.vectors.views(name)
    if views is not None:  # a multivector collection: each query sends all its views
        queries = queries.reshape(len(queries), views, -1)
    k = min(recall_k, len(ids) - 1)
    exact = index.search(queries, k + 1)[1] if k > 0 and len(sample) else []
    faiss_latency = _latency(lambda v: index.search(v[None], recall_k), queries[:latency_queries])
    sweep = []
    for params in search:
        recall = _recall(session, name, index, sample, queries, exact, k, params) if exact else 1.0
        latency = _latency(lambda v: session.vectors.search(name, v[None], recall_k, params=params),
                           queries[:latency_queries])
        sweep.append({"hnsw_ef": params.hnsw_ef, "recall": recall, **latency})
    info = session.vectors.index_info(name)
    latency_ms = {"qdrant": {p: sweep[0][p] for p in ("p50", "p95", "p99") if p in sweep[0]}, "faiss": faiss_latency}
    deduplicated = None
    if exclude_duplicates:  # pairs decided on the meshes: the same for every collection of these objects
        from .dedup import DedupOptions, confirmed_pairs, find_duplicates

        pairs = confirmed_pairs(find_duplicates(session, DedupOptions(collections=(name,))), ids)
        dedup = ranking_metrics(index.vectors, labels, exclude=pairs, views=index.views)
        deduplicated = {"pairs": len(pairs),
                        **{f"p@{k_}": _mean(dedup["precision"][k_]) for k_ in PRECISION_AT},
                        "map": _mean(dedup["ap"]), "nn_acc": _mean(dedup["nn"])}
    return CollectionEval(
        collection=name, objects=len(ids), classes=len(per_class), deduplicated=deduplicated,
        precision={k_: _mean(metrics["precision"][k_]) for k_ in PRECISION_AT},
        map=_mean(metrics["ap"]), nn_accuracy=_mean(metrics["nn"]), per_class=per_class,
        first_tier=_mean(metrics["ft"]), second_tier=_mean(metrics["st"]), dcg=_mean(metrics["dcg"]),
        excluded=int((~scored).sum()),
        recall_k=recall_k, recall=sweep[0]["recall"], recall_queries=len(sample),
        latency_ms={e: lat for e, lat in latency_ms.items() if lat},
        index=info.state, indexed=info.indexed, sweep=sweep,
    )


def _damaged_rows(vectors: np.ndarray, views: int = 1) -> int:
    """Rows that are not unit vectors (stored vectors always are; a multivector row holds `views` unit
    vectors), counted a chunk at a time."""
    bad = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for lo in range(0, len(vectors), CHUNK):
            chunk = vectors[lo:lo + CHUNK]
            norms = np.linalg.norm(chunk.reshape(len(chunk), views, -1), axis=2)
            bad += int((~(np.abs(norms - 1.0) <= 1e-3)).any(axis=1).sum())
    return bad


def _recall(session: Session, name: str, index, sample: np.ndarray, queries: np.ndarray, exact: list[list[str]],
            k: int, params: SearchSettings) -> float:
    """Mean recall@k of Qdrant's answers against FAISS's for the same query vectors, self excluded.
    A hit counts when FAISS has it too or when it ties FAISS's k-th score (float noise between
    engines reorders equal-scored neighbours; neither answer is wrong then)."""
    answers = []
    for lo in range(0, len(queries), CHUNK):
        answers += session.vectors.search(name, queries[lo:lo + CHUNK], k + 1, params=params)
    def exact_score(q: int, pid: str) -> float:
        return float(scores(queries[q:q + 1], index.vectors[[index.row(pid)]], index.views)[0, 0])

    recalls = []
    for q, (row, q_hits, f_ids) in enumerate(zip(sample, answers, exact)):
        own = index.ids[row]
        f_top = [i for i in f_ids if i != own][:k]
        kth_score = exact_score(q, f_top[-1])
        good = [h.id for h in q_hits if h.id != own][:k]
        recalls.append(sum(1 for pid in good if pid in f_top or (index.row(pid) is not None and
                           exact_score(q, pid) >= kth_score - TIE_EPS)) / k)
    return float(np.mean(recalls))


def _latency(search, queries: np.ndarray) -> dict[str, float]:
    """Single-query latency percentiles (ms), one query at a time as a user's `m3d query` runs them."""
    import faiss

    faiss.omp_set_num_threads(1)
    timings = []
    for vector in queries:
        start = time.perf_counter()
        search(vector)
        timings.append((time.perf_counter() - start) * 1000)
    return {f"p{p}": float(np.percentile(timings, p)) for p in (50, 95, 99)} if timings else {}


def evaluate(session: Session, collections: list[str] | None = None, **kwargs) -> list[CollectionEval]:
    """Every named collection (default: all) with at least two objects; smaller ones have no neighbours
    to rank and are left out rather than reported as NaN."""
    if not isinstance(kwargs.get("exclude_duplicates", False), bool):
        raise UsageError("exclude_duplicates is True or False now (it removes the pairs m3d dedup confirms on the "
                         f"meshes), not a cosine: got {kwargs['exclude_duplicates']!r}")
    names = collections or session.collections()
    for name in names:
        session.require(name)
    return [evaluate_collection(session, name, **kwargs) for name in names if session.vectors.count(name) >= 2]


def require_writable(out_dir: Path, *, default: bool) -> None:
    """Before any work: a folder the results cannot be written to (a read-only store) is one line that
    says where else to write them, not an error after minutes of evaluation."""
    import tempfile

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        hint = ": pass --out DIR to write the results elsewhere" if default else ""
        raise UsageError(f"cannot write the results to {out_dir} ({exc.strerror or exc}){hint}") from None


def write_results(results: list[CollectionEval], out_dir: Path) -> list[Path]:
    """eval.csv (one row per collection), eval_per_class.csv and eval.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "eval.csv"
    rows = [r.row() for r in results]
    with open(summary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["collection"])
        writer.writeheader()
        writer.writerows({key: spreadsheet_cell(value) for key, value in row.items()} for row in rows)
    per_class = out_dir / "eval_per_class.csv"
    with open(per_class, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["collection", "class", "objects", *[f"p@{k}" for k in PRECISION_AT], "map"])
        for r in results:
            for label, m in r.per_class.items():
                writer.writerow([r.collection, spreadsheet_cell(label), m["objects"], *[round(m[f"p@{k}"], 4) for k in PRECISION_AT],
                                 round(m["map"], 4)])
    full = out_dir / "eval.json"
    full.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return [summary, per_class, full]


# -- rotation robustness ----------------------------------------------------------------------
ROTATIONS = ("yaw", "any")


@dataclass
class RotationEval:
    """p@5 / NN / mAP of stored objects queried again after a random rotation, beside the same
    objects' unrotated figures (each query's own point excluded in both)."""

    collection: str
    rotation: str  # "yaw" (about the object's up axis) or "any" (uniform over 3D rotations)
    seed: int
    queries: int  # objects rotated, re-embedded and scored
    excluded: int  # of those, alone in their class (left out of the figures)
    missing: int  # sources not on this machine (not queried)
    rotated: dict[str, float]
    unrotated: dict[str, float]

    def row(self) -> dict:
        return {"collection": self.collection, "rotation": self.rotation, "queries": self.queries,
                **{f"{k} rotated": round(v, 4) for k, v in self.rotated.items()},
                **{f"{k} unrotated": round(v, 4) for k, v in self.unrotated.items()},
                "excluded": self.excluded, "missing": self.missing}


def random_rotation(rng: np.random.Generator, kind: str, pose_rotation: np.ndarray) -> np.ndarray:
    """A proper rotation in the file's frame: a turn about the axis the object's stored pose put up
    (yaw), or uniform over all rotations (any: QR of a Gaussian matrix with the sign fixed)."""
    if kind == "yaw":
        a = rng.uniform(0.0, 2 * np.pi)
        c, s = np.cos(a), np.sin(a)
        yaw = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
        return pose_rotation.T @ yaw @ pose_rotation
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def rotation_robustness(session: Session, names: list[str], *, objects: int, seed: int = 0,
                        rotation: str = "yaw") -> list[RotationEval]:
    """Re-embed `objects` stored objects (chosen by seed) after a random rotation, with each
    collection's own settings, and query each against its collection. Collections that share an
    encoder and view settings share the renders and the encoding (only the pool differs)."""
    from .meshio import load_mesh
    from .orientation import pose
    from .pooling import ORDERED, pool
    from .render import create_renderer, posed
    from .search import collection_consensus, collection_encoder

    if rotation not in ROTATIONS:
        raise UsageError(f"unknown rotation {rotation!r}; choose one of: {', '.join(ROTATIONS)}")
    if objects < 1:
        raise UsageError(f"--rotate needs a positive number of objects, got {objects}")
    groups: dict[tuple, list[str]] = {}
    for name in names:
        fp = session.fingerprint(name)
        groups.setdefault((fp.encoder, fp.view), []).append(name)
    out = []
    for (_, view), members in groups.items():
        fp = session.fingerprint(members[0])
        payloads = {r.id: r.payload for r in session.vectors.records(members[0], fields=["class", "path", "dataset", "pose"])}
        dataset = collection_consensus(session, members[0]) if view.up == "auto" else None
        rng = np.random.default_rng(seed)
        ids = sorted(payloads)
        chosen = [ids[i] for i in np.sort(rng.choice(len(ids), size=min(objects, len(ids)), replace=False))]
        encoder = collection_encoder(session, fp)
        renderer = create_renderer(view)
        per_view, missing = {}, 0  # point id -> (views, dim) of its rotated renders
        try:
            for pid in chosen:
                path = session.source_path(payloads[pid])
                if path is None or not path.is_file():
                    missing += 1
                    continue
                stored = np.asarray((payloads[pid].get("pose") or {}).get("rotation", np.eye(3)), dtype=np.float64)
                turned = posed(load_mesh(path), random_rotation(rng, rotation, stored))
                placed = pose(turned, view, dataset, suffix=path.suffix)
                per_view[pid] = encoder.encode(renderer.render(posed(turned, placed.rotation)))
        finally:
            renderer.close()
        for name in members:
            index = session.exact(name)
            row_of = {pid: row for row, pid in enumerate(index.ids)}
            labels = np.array([str(payloads.get(i, {}).get("class")) for i in index.ids])
            queried = [pid for pid in per_view if pid in row_of]
            rows = np.array([row_of[pid] for pid in queried], dtype=int)
            pool_name = session.fingerprint(name).pool
            # one query at a time: a multivector query holds the views that showed the rotated object
            slots = view.views if pool_name in ORDERED else None  # a ring's orders need every slot
            rotated = [pool(pool_name, per_view[pid][None], slots).cpu().numpy() for pid in queried]
            figures = {}
            for kind, vectors in (("rotated", rotated), ("unrotated", [index.vectors[[r]] for r in rows])):
                sims = np.concatenate([scores(v, index.vectors, index.views) for v in vectors]) if len(rows) \
                    else np.zeros((0, len(index)), np.float32)
                sims[np.arange(len(rows)), rows] = -np.inf  # never its own stored point
                m = score_queries(sims, labels[rows], labels)
                figures[kind] = {"p@5": _mean(m["precision"][5]), "nn": _mean(m["nn"]), "map": _mean(m["ap"])}
            out.append(RotationEval(name, rotation, seed, len(rows), int((~m["scored"]).sum()), missing,
                                    figures["rotated"], figures["unrotated"]))
    return out
