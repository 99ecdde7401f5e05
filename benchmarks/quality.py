"""Retrieval quality per encoder x pool x layout on one dataset (issue 16's table):

    python benchmarks/quality.py --data ../shared/datasets/psb-train --encoders hog --up y,default

One sync per (encoder, layout, up) into a fresh store in a temporary folder, every pool from the same
renders and encodings; then `m3d eval` on every collection (every object queries all others, self
excluded: p@5, mAP, NN, FT, ST, DCG) and `m3d eval --rotate N --rotation any` (p@5 of N objects
re-embedded under a uniform random 3D rotation). Layouts: ring (the default 8-view ring), sphere
(--layout sphere --views 12), pca (--align pca --layout sphere --views 12; its pose is its own, so it
runs with the default --up only). The ring pool (best cyclic shift) runs on the ring layout only. Bytes per object: the float32 vector bytes Qdrant holds per point
(dim x vectors per point x 4), and the store's allocated bytes on disk per object (Qdrant's segments,
WAL and payloads, FAISS; small collections carry the engine's preallocated chunks, so read that one
as an upper bound). Objects/s: the sync's own figure (render + encode + write of all pools together).
Prints a markdown table and writes JSON to benchmarks/results/quality-<dataset>.json.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from m3d.evaluate import evaluate, rotation_robustness  # noqa: E402
from m3d.pipeline import SyncOptions, sync  # noqa: E402
from m3d.render import ViewSettings  # noqa: E402
from m3d.store import open_session  # noqa: E402

#: layout name -> the ViewSettings fields that make it (up is set per run)
LAYOUTS = {"ring": {}, "sphere": {"layout": "sphere", "views": 12},
           "pca": {"layout": "sphere", "views": 12, "align": "pca"}}
COLUMNS = ("encoder", "pool", "layout", "up", "p@5", "map", "nn", "ft", "st", "dcg", "rot p@5",
           "vector B/obj", "disk B/obj", "obj/s")


def allocated(path: Path) -> int:
    """Bytes the files under path occupy on disk (allocated blocks: sparse engine files count as used)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def run(data: Path, encoder: str, layout: str, up: str, pools: tuple[str, ...], rotate: int, workers: int | None,
        scratch: Path) -> list[dict]:
    fields = dict(LAYOUTS[layout])
    if up != "default":
        fields["up"] = up
    pools = tuple(p for p in pools if p != "ring" or layout == "ring")  # the ring pool needs the ring layout
    options = SyncOptions(encoders=(encoder,), pools=pools, view=ViewSettings(**fields), workers=workers)
    store = scratch / f"{encoder}-{layout}-{up}"
    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    with open_session(store) as session:
        report = sync(session, data, options)
        synced = time.perf_counter() - started
        results = evaluate(session)
        rotated = {r.collection: r for r in rotation_robustness(session, [r.collection for r in results],
                                                                 objects=rotate, rotation="any")} if rotate else {}
        rows = []
        for r in results:
            dim, views = session.vectors.dim(r.collection), session.vectors.views(r.collection) or 1
            disk = allocated(store / "qdrant" / session.vectors.physical(r.collection)) + \
                allocated(store / "faiss") // len(results)
            fp = session.fingerprint(r.collection)
            rows.append({"encoder": encoder, "pool": fp.pool, "layout": layout, "up": up,
                         "p@5": r.precision[5], "map": r.map, "nn": r.nn_accuracy, "ft": r.first_tier,
                         "st": r.second_tier, "dcg": r.dcg,
                         "rot p@5": rotated[r.collection].rotated["p@5"] if r.collection in rotated else None,
                         "vector B/obj": dim * views * 4, "disk B/obj": disk // max(1, r.objects),
                         "obj/s": report.objects_per_s, "objects": r.objects, "recall@10": r.recall,
                         "index": r.index, "sync_s": synced, "skipped": len(report.skipped),
                         "rotated_queries": rotated[r.collection].queries if r.collection in rotated else 0})
    shutil.rmtree(store, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(key: str, value) -> str:
        if value is None:
            return "-"
        if key in ("nn", "ft", "st", "dcg"):
            return f"{100 * value:.1f}"
        if isinstance(value, float):
            return f"{value:.1f}" if key == "obj/s" else f"{value:.3f}"
        return str(value)

    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cell(k, row[k]) for k in COLUMNS) + " |" for row in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--encoders", default="hog", help="comma-separated encoder specs")
    ap.add_argument("--pools", default="mean,max,attn,views,ring", help="ring runs on the ring layout only")
    ap.add_argument("--layouts", default="ring,sphere,pca", help=f"comma-separated: {', '.join(LAYOUTS)}")
    ap.add_argument("--up", default="default", help="comma-separated up axes (y, z, ...) and/or 'default' "
                    "(m3d's own default rule); pca runs with the default only")
    ap.add_argument("--rotate", type=int, default=100, help="objects re-embedded under a random 3D rotation")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    pools = tuple(args.pools.split(","))
    scratch = Path(tempfile.mkdtemp(prefix="m3d-quality-"))
    rows = []
    try:
        for encoder in args.encoders.split(","):
            for layout in args.layouts.split(","):
                for up in args.up.split(","):
                    if layout == "pca" and up != "default":
                        continue
                    done = run(args.data, encoder, layout, up, pools, args.rotate, args.workers, scratch)
                    rows += done
                    print(markdown(done), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = args.out or HERE / "results" / f"quality-{args.data.resolve().name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"data": str(args.data), "command": " ".join(sys.argv), "load": os.getloadavg(), "rows": rows}
    out.write_text(json.dumps(meta, indent=2))
    print(f"\n{markdown(rows)}\n\nwrote {out}")


if __name__ == "__main__":
    main()
