"""What a views collection costs and what cheaper forms of it lose (issue 16 item 1):

    python benchmarks/views_memory.py --data ../shared/datasets/psb-train --up y

One sync (hog, pools mean and views) into a store whose collections keep int8 scalar-quantized
vectors in RAM beside float32 originals memory-mapped from disk (--quantization int8 --on-disk
--index-threshold 0: the HNSW graph is built over the multivectors). Then, for the views collection:

- exact: p@5 / mAP / NN of the exact MaxSim over the float32 rows (what `m3d eval` reports);
- qdrant int8: the same figures from Qdrant's own answers (HNSW over int8 multivectors, rescored with
  the originals, oversampling 2), and its recall@10 against the exact MaxSim;
- fewer dimensions: exact MaxSim after projecting every view vector on its first d principal axes
  (fitted on the collection's own view vectors, no labels), rows renormalised;
- ring order under the best cyclic shift (the Light Field Descriptor's rule, invariant to yaw), as a
  multivector of the V cyclic orders of the concatenated view vectors scores it under MaxSim: full
  dims, and as `--pools ring` stores it (each view projected to RING_DIMS by its seeded matrix);
- bytes per object of each form, and the mean pool's figures beside them.
Writes benchmarks/results/views-memory-<dataset>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from m3d.connector import IndexSettings  # noqa: E402
from m3d.evaluate import evaluate, ranking_metrics, score_queries  # noqa: E402
from m3d.pipeline import SyncOptions, sync  # noqa: E402
from m3d.pooling import RING_DIMS, pool  # noqa: E402
from m3d.render import ViewSettings  # noqa: E402
from m3d.store import open_session  # noqa: E402


def summary(metrics: dict) -> dict:
    def mean(values):
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else 0.0

    return {"p@5": mean(metrics["precision"][5]), "map": mean(metrics["ap"]), "nn": mean(metrics["nn"])}


def shift_metrics(ring: np.ndarray, labels: np.ndarray) -> dict:
    """Ranking by the best cyclic shift of ring-ordered unit views: max over s of the mean over i of
    q_i . d_(i+s) (what a multivector of the object's V cyclic orders scores under MaxSim)."""
    n, views, _ = ring.shape
    query = ring.reshape(n, -1)
    sims = np.max([query @ np.roll(ring, -s, axis=1).reshape(n, -1).T for s in range(views)], axis=0) / views
    np.fill_diagonal(sims, -np.inf)
    return score_queries(sims.astype(np.float32), labels, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--up", default="y")
    ap.add_argument("--dims", default="64,128,256,512")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    store = Path(tempfile.mkdtemp(prefix="m3d-views-memory-"))
    index = IndexSettings(quantization="int8", on_disk=True, index_threshold=0)
    options = SyncOptions(encoders=("hog",), pools=("mean", "views"), view=ViewSettings(up=args.up), index=index)
    rows = []
    try:
        with open_session(store) as session:
            report = sync(session, args.data, options)
            evals = {e.collection: e for e in evaluate(session)}
            exact = session.exact("m3d_hog_views")
            views = exact.views
            labels_by_id = {r.id: r.payload["class"] for r in session.vectors.records("m3d_hog_views", fields=["class"])}
            labels = np.array([labels_by_id[i] for i in exact.ids])
            flat = np.asarray(exact.vectors)
            dim = flat.shape[1] // views
            n = len(flat)
            mean_eval = evals["m3d_hog_mean"]
            rows.append({"form": "mean pool, float32 (one vector)", "bytes": dim * 4, "p@5": mean_eval.precision[5],
                         "map": mean_eval.map, "nn": mean_eval.nn_accuracy, "recall@10": None})
            rows.append({"form": f"views, float32 exact MaxSim ({views} x {dim})", "bytes": views * dim * 4,
                         **summary(ranking_metrics(flat, labels, views=views)), "recall@10": None})
            # Qdrant's own answers over int8 multivectors: the object's own point dropped, then ranked
            start = time.perf_counter()
            queries = flat.reshape(n, views, dim)
            hits = []
            for lo in range(0, n, 64):
                hits += session.vectors.search("m3d_hog_views", queries[lo:lo + 64], 11)
            seconds = time.perf_counter() - start
            row_of = {pid: r for r, pid in enumerate(exact.ids)}
            same = np.array([[labels[row_of[h.id]] == labels[q] for h in answer if h.id != exact.ids[q]][:5]
                             for q, answer in enumerate(hits)])  # every class here has another member
            top = {"p@5": float(same.mean()), "nn": float(same[:, 0].mean())}
            rows.append({"form": "views, Qdrant HNSW over int8 (rescored)", "bytes": views * dim,
                         "p@5": top["p@5"], "map": None, "nn": top["nn"],
                         "recall@10": evals["m3d_hog_views"].recall, "query_ms": 1000 * seconds / n})
            per_view = flat.reshape(-1, dim)
            centre = per_view.mean(axis=0)
            _, _, axes = np.linalg.svd(per_view - centre, full_matrices=False)
            for d in map(int, args.dims.split(",")):
                reduced = (per_view - centre) @ axes[:d].T
                reduced /= np.linalg.norm(reduced, axis=1, keepdims=True)
                rows.append({"form": f"views, PCA to {d} dims per view, exact MaxSim", "bytes": views * d * 4,
                             **summary(ranking_metrics(reduced.reshape(n, -1).astype(np.float32), labels, views=views)),
                             "recall@10": None})
            # the Light Field Descriptor's rule on the ring: views matched in ring order under the best cyclic
            # shift (yaw-invariant), with full dims, and as --pools ring stores it (reduced views, MaxSim)
            ring = flat.reshape(n, views, dim)
            rows.append({"form": "ring order, best cyclic shift, full dims", "bytes": views * views * dim * 4,
                         **summary(shift_metrics(ring, labels)), "recall@10": None})
            orders = pool("ring", torch.from_numpy(ring)).numpy()
            rows.append({"form": f"--pools ring ({views} orders x {views} x {RING_DIMS} dims), exact MaxSim",
                         "bytes": orders[0].size * 4,
                         **summary(ranking_metrics(orders.reshape(n, -1), labels, views=views)), "recall@10": None})
            disk = sum(p.stat().st_blocks * 512 for p in (store / "qdrant").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(store, ignore_errors=True)
    print("| form | bytes/object | p@5 | mAP | NN | recall@10 |\n|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["form"], str(r["bytes"])] + ["-" if r[k] is None else f"{r[k]:.3f}" for k in ("p@5", "map", "nn", "recall@10")]
        print("| " + " | ".join(cells) + " |")
    out = args.out or HERE / "results" / f"views-memory-{args.data.resolve().name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "load": os.getloadavg(), "objects": n,
                               "objects_per_s": report.objects_per_s, "qdrant_disk_bytes": disk, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
