"""A mixed library, measured (not a test): psb-train and lpsb with a share of files re-saved in another
axis convention and a share turned arbitrarily (not axis-aligned), synced with the default and with
the fixed alternatives; retrieval p@5, mAP and NN accuracy per setting.

    python benchmarks/mixed_library.py                          # 30% x/z convention, 15% any rotation, seed 0
    python benchmarks/mixed_library.py --axis 0.5 --any 0       # half the files in another convention
    python benchmarks/mixed_library.py --settings "--up auto,--up y" --data ../shared/datasets/lpsb

The tree (in a temporary directory, removed afterwards): each class as <source>-<class>/ (the two
benchmarks' labels never merge); a file kept as shipped is a symlink, a re-saved one an OFF file written
with its shipped up (+y: both benchmarks are mostly +y up) turned to +x or +z (drawn per file), an
arbitrary one turned by a uniform random rotation. Per setting, one `sync --encoders hog --pools mean`
into a fresh store, then every object queries all others (self excluded, as `m3d eval` does). The sync
summary's up rules are kept with the figures.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

SETTINGS = {"--up auto": {"up": "auto"}, "--up y": {"up": "y"}, "--up z": {"up": "z"},
            "--align pca --layout sphere --views 12": {"align": "pca", "layout": "sphere", "views": 12}}
SHARED = HERE.parent.parent / "shared" / "datasets"


def build_tree(sources: list[Path], root: Path, axis: float, arbitrary: float, seed: int) -> dict[str, str]:
    """Write the library under root; returns relative path -> how the file was stored ("y" as shipped,
    "x"/"z" re-saved in that convention, "any" arbitrarily turned)."""
    from m3d.meshio import load_mesh, write_off
    from m3d.orientation import AXIS_ROTATIONS
    from m3d.render import posed

    rng = np.random.default_rng(seed)
    how: dict[str, str] = {}
    for source in sources:
        for path in sorted(source.glob("*/*.off")):
            rel = f"{source.name}-{path.parent.name}/{path.name}"
            draw = rng.random()
            turn = "y" if draw >= axis + arbitrary else ("any" if draw >= axis else ("x", "z")[int(rng.integers(2))])
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if turn == "y":
                dest.symlink_to(path.resolve())
            else:
                if turn == "any":
                    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
                    q = q * np.sign(np.diag(r))
                    rotation = q if np.linalg.det(q) > 0 else -q
                else:
                    rotation = AXIS_ROTATIONS[turn].T  # +y (the shipped up) to +turn
                write_off(posed(load_mesh(path), rotation), dest)
            how[rel] = turn
    return how


def main() -> None:
    from m3d.evaluate import ranking_metrics
    from m3d.pipeline import SyncOptions, sync
    from m3d.render import ViewSettings
    from m3d.store import open_session

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", default=[SHARED / "psb-train", SHARED / "lpsb"])
    ap.add_argument("--axis", type=float, default=0.3, help="share re-saved in another axis convention (+x or +z)")
    ap.add_argument("--any", type=float, default=0.15, help="share turned by a uniform random rotation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated keys of SETTINGS")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/mixed-library-<axis>-<any>.json")
    args = ap.parse_args()
    out = args.out or HERE / "results" / f"mixed-library-{args.axis:g}-{args.any:g}.json"
    work = Path(tempfile.mkdtemp(prefix="m3d-mixed-"))
    try:
        how = build_tree(args.data, work / "tree", args.axis, args.any, args.seed)
        results = {"objects": len(how), "sources": [str(d) for d in args.data], "axis": args.axis, "any": args.any,
                   "seed": args.seed, "stored_as": {k: sum(v == k for v in how.values()) for k in ("y", "x", "z", "any")},
                   "load_average_at_start": os.getloadavg()[0], "settings": {}}
        print(json.dumps({k: v for k, v in results.items() if k != "settings"}), flush=True)
        for key in args.settings.split(","):
            store = work / f"store-{len(results['settings'])}"
            start = time.perf_counter()
            with open_session(store) as session:
                report = sync(session, work / "tree", SyncOptions(encoders=("hog",), pools=("mean",),
                                                                  view=ViewSettings(**SETTINGS[key])))
                records = list(session.vectors.records("m3d_hog_mean", vectors=True))
            seconds = time.perf_counter() - start
            vectors = np.stack([r.vector for r in records]).astype(np.float32)
            labels = np.array([r.payload["class"] for r in records])
            m = ranking_metrics(vectors, labels)
            scored = m["scored"]
            stored_as = np.array([how[r.payload["path"]] for r in records])
            row = {"objects": len(records), "p@5": float(np.mean(m["precision"][5][scored])),
                   "map": float(np.mean(m["ap"][scored])), "nn": float(np.mean(m["nn"][scored])),
                   "p@5_by_stored_as": {k: float(np.mean(m["precision"][5][scored & (stored_as == k)]))
                                        for k in ("y", "x", "z", "any") if (scored & (stored_as == k)).any()},
                   "sync_seconds": round(seconds, 1), "load_average": os.getloadavg()[0],
                   "orientation": report.orientation}
            sources = [(r.payload.get("pose") or {}).get("source") for r in records]
            row["pose_sources"] = {s: sources.count(s) for s in sorted(set(map(str, sources)))}
            results["settings"][key] = row
            print(key, json.dumps({k: v for k, v in row.items() if k != "orientation"}), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
