"""Planted duplicates: recall per kind of copy and false pairs, for `m3d dedup` (issue 20).

For each dataset: a temp tree of symlinks to every mesh (the data is never written), plus, for a seeded
spread of originals, one planted copy of every kind (tests/helpers.PLANTS: jitter 1e-4 and 1e-3 of the
size, 50% decimation, subdivision, a random rotation with and without a scale, re-ordered vertices and
faces, conversion to OBJ/PLY/STL/GLB) and a byte copy. The tree is synced with the weight-free HOG
encoder (mean pool), then `find_duplicates` runs with the given proposal settings. Every confirmed pair
is judged against the truth: an original and its planted copies are one group; two originals are one
group only when they are copies already in the dataset, which an independent test decides (the same
number of vertices and the same sorted vertex distances from the vertex centroid, to 1e-4 of the
radius: true for a re-ordered, turned or re-saved mesh, false for any edit). The hard negatives are
all other pairs, different objects of one fine class among them.

    python benchmarks/dedup_planted.py --dataset ../shared/datasets/lpsb --originals 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))  # the planting kinds live with the tests (helpers.PLANTS)

from helpers import PLANTS, plant_copy  # noqa: E402
from m3d.meshio import MESH_EXTENSIONS, load_mesh  # noqa: E402

KINDS = ["bytes", *PLANTS]


def _signature(path: Path) -> np.ndarray | None:
    try:
        v = load_mesh(path).vertices.astype(np.float64)
    except Exception:  # noqa: BLE001  (an unreadable file is no one's copy)
        return None
    r = np.linalg.norm(v - v.mean(0), axis=1)
    return np.sort(r / r.max())


def _native_copies(files: list[Path], pairs: set[tuple[str, str]], root: Path) -> set[tuple[str, str]]:
    """Of the found pairs between two originals, those the independent test calls the same mesh."""
    out = set()
    for a, b in pairs:
        sa, sb = _signature(root / a), _signature(root / b)
        if sa is not None and sb is not None and len(sa) == len(sb) and np.abs(sa - sb).max() <= 1e-4:
            out.add((a, b))
    return out


def build_tree(dataset: Path, root: Path, originals: int, seed: int, classes: int | None = None
               ) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Symlinks of every mesh under root (of `classes` seeded classes, whole, if given); planted copies
    of `originals` of them. Returns the original relative paths and {copy path: (original, kind)}."""
    files = sorted(p for p in dataset.rglob("*") if p.suffix.lower() in MESH_EXTENSIONS and p.is_file())
    if classes is not None:
        names = sorted({p.relative_to(dataset).parts[0] for p in files})
        keep = set(np.random.default_rng(seed).choice(names, size=min(classes, len(names)), replace=False))
        files = [p for p in files if p.relative_to(dataset).parts[0] in keep]
    rel = [str(p.relative_to(dataset)) for p in files]
    for p, r in zip(files, rel):
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        (root / r).symlink_to(p.resolve())
    rng = np.random.default_rng(seed)
    chosen = [rel[i] for i in sorted(rng.choice(len(rel), size=min(originals, len(rel)), replace=False))]
    planted = {}
    for n, orig in enumerate(chosen):
        stem = Path(orig).with_suffix("")
        for kind in KINDS:
            dest = root / stem.parent / f"planted_{kind}_{stem.name}"
            if kind == "bytes":
                written = dest.with_name(dest.name + ".off")
                shutil.copyfile(dataset / orig, written)
            else:
                written = plant_copy(dataset / orig, dest, kind, seed=seed * 1000 + n)
            planted[str(written.relative_to(root))] = (orig, kind)
    return rel, planted


def run(dataset: Path, work: Path, args) -> dict:
    from m3d.dedup import DedupOptions, find_duplicates
    from m3d.pipeline import SyncOptions, sync
    from m3d.render import ViewSettings
    from m3d.store import open_session

    tree = work / dataset.name
    originals, planted = build_tree(dataset, tree, args.originals, args.seed, args.classes)
    view = ViewSettings(align="pca") if args.align == "pca" else ViewSettings(up="y")
    options = SyncOptions(encoders=("hog",), pools=("mean",), workers=args.workers, view=view)
    start = time.perf_counter()
    with open_session(work / f"store-{dataset.name}") as session:
        sync(session, tree, options)
        sync_seconds = time.perf_counter() - start
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        dedup_options = DedupOptions(candidates=args.candidates, min_cosine=args.min_cosine)
        result = find_duplicates(session, dedup_options)
        dedup_seconds = time.perf_counter() - start
        load_after = os.getloadavg()[0]
        tenfold = _tenfold(session, tree, dedup_options) if args.tenfold else None

    truth = {c: o for c, (o, _) in planted.items()}  # copy -> its original
    found = {tuple(sorted((a.path, b.path))): p for a, b, p in result.pairs()}
    between_originals = {k for k in found if k[0] not in truth and k[1] not in truth}
    native = _native_copies([], between_originals, tree)
    comps = {o: o for o in originals}  # truth groups: union-find over originals joined by native copies

    def root(x: str) -> str:
        while comps[x] != x:
            x = comps[x]
        return x

    for a, b in native:
        comps[root(a)] = root(b)

    def group(path: str) -> str:
        return root(truth.get(path, path))

    false_pairs = [k for k in found if group(k[0]) != group(k[1])]
    per_kind = {}
    # a planted copy is found when it lands in one confirmed group with its original
    members = defaultdict(set)
    for g_n, g in enumerate(result.groups):
        for m in g.members:
            members[m.path].add(g_n)
    measured = {tuple(sorted((c.a, c.b))): c for c in result.checked}
    for kind in KINDS:
        copies = [c for c, (_, k) in planted.items() if k == kind]
        hits = [c for c in copies if members[c] & members[truth[c]]]
        direct = [found.get(tuple(sorted((c, truth[c])))) for c in copies]
        labels = Counter(p.kind for p in direct if p is not None)
        proposed = sum(tuple(sorted((c, truth[c]))) in measured for c in copies)
        hd = [p.match.hausdorff for p in direct if p is not None and p.match is not None]
        per_kind[kind] = {"planted": len(copies), "found": len(hits), "recall": len(hits) / max(len(copies), 1),
                          "proposed_directly": proposed, "kinds": dict(labels),
                          "max_hausdorff": max(hd) if hd else None}
    # the closest different objects the vectors proposed: the margin under the near bound
    rejected = sorted((c.hausdorff, c.a, c.b) for c in result.checked if c.kind is None and c.hausdorff is not None
                      and group(c.a) != group(c.b))
    same_class = [r for r in rejected if Path(r[1]).parts[0] == Path(r[2]).parts[0]]
    copies_total = len(planted)
    found_total = sum(v["found"] for v in per_kind.values())
    return {"dataset": dataset.name, "objects": result.objects, "originals": len(originals), "planted": copies_total,
            "found": found_total, "recall": found_total / max(copies_total, 1), "confirmed_pairs": len(found),
            "false_pairs": false_pairs, "precision": 1 - len(false_pairs) / max(len(found), 1),
            "native_copies": sorted(native), "per_kind": per_kind,
            "closest_rejected": [{"hausdorff": h, "a": a, "b": b} for h, a, b in rejected[:10]],
            "closest_rejected_same_class": [{"hausdorff": h, "a": a, "b": b} for h, a, b in same_class[:10]],
            "cost": result.cost, "sync_seconds": round(sync_seconds, 1), "dedup_seconds": round(dedup_seconds, 1),
            "load": [round(load_before, 1), round(load_after, 1)], "tenfold": tenfold,
            "settings": {"classes": args.classes, "align": args.align, "candidates": args.candidates, "min_cosine": args.min_cosine, "originals": args.originals,
                         "seed": args.seed, "near": result.options.near, "samples": result.options.samples}}


def _tenfold(session, tree: Path, options) -> dict:
    """The cost on a 10x tree: every file of the tree beside nine symlinks to it (copy1_<name> ...). Its
    points are the synced points cloned with the new paths (a symlink's file, so its vector, is the
    same; syncing 9x the renders again would measure sync, not dedup)."""
    import uuid

    from m3d.dedup import find_duplicates

    name = session.collections()[0]
    records = list(session.vectors.records(name, vectors=True))
    for copy in range(1, 10):
        ids, vectors, payloads = [], [], []
        for rec in records:
            rel = Path(rec.payload["path"])
            new = rel.with_name(f"copy{copy}_{rel.name}")
            (tree / new).symlink_to((tree / rel).resolve())
            ids.append(str(uuid.uuid5(uuid.NAMESPACE_URL, f"tenfold/{new}")))
            vectors.append(rec.vector)
            payloads.append({**rec.payload, "path": str(new)})
        session.upsert(name, ids, np.stack(vectors), payloads)
    session.finish(name)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = find_duplicates(session, options)
    return {"objects": result.objects, "seconds": round(time.perf_counter() - start, 1), "cost": result.cost,
            "exact_groups": len(result.of_kind("exact")), "groups": len(result.groups),
            "load": [round(load, 1), round(os.getloadavg()[0], 1)]}


def table(results: list[dict]) -> str:
    lines = ["| kind of copy | " + " | ".join(f"{r['dataset']} found / planted (kinds given)" for r in results) + " |",
             "|---|" + "---|" * len(results)]
    for kind in KINDS:
        cells = []
        for r in results:
            k = r["per_kind"][kind]
            given = ", ".join(f"{n} {name}" for name, n in sorted(k["kinds"].items()))
            cells.append(f"{k['found']}/{k['planted']} ({given})")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("| **all planted** | " + " | ".join(f"**{r['found']}/{r['planted']}** recall {r['recall']:.3f}"
                                                  for r in results) + " |")
    lines.append("| confirmed pairs, false | " + " | ".join(
        f"{r['confirmed_pairs']}, {len(r['false_pairs'])} false (precision {r['precision']:.3f})" for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, action="append", required=True)
    parser.add_argument("--originals", type=int, default=10, help="meshes copied, one copy of every kind each")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--min-cosine", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=None, help="only this many (seeded) classes, each whole")
    parser.add_argument("--align", choices=("none", "pca"), default="pca",
                        help="the proposing HOG collection's pose: pca (turned copies render alike) or none (+y up)")
    parser.add_argument("--tenfold", action="store_true", help="also time dedup on a 10x symlink tree of each")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dedup")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="dedup-planted-") as tmp:
        for dataset in args.dataset:
            r = run(dataset.resolve(), Path(tmp), args)
            (args.out / f"{r['dataset']}.json").write_text(json.dumps(r, indent=2, default=str))
            results.append(r)
            print(json.dumps({k: r[k] for k in ("dataset", "recall", "confirmed_pairs", "precision", "cost",
                                                 "dedup_seconds", "load")}, default=str), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
