"""A mixed library, measured (not a test): labelled LPSB meshes each written in a random axis convention,
synced with each view setting; how often auto stands objects upright and what retrieval sees.

    python benchmarks/conventions.py                       # x, y, z conventions (what files use), seed 0
    python benchmarks/conventions.py --conventions x,y     # the half x-up / half y-up OBJ library case
    python benchmarks/conventions.py --conventions y --settings "--up y"   # the ceiling: every file upright

Every labelled mesh (benchmarks/lpsb_up_labels.txt: the axis that is up in the file as shipped) is turned
so that its true up becomes a convention drawn at random per file, and written as OFF under class/ in a
temporary tree. Per setting (`--up y`, the old fixed ring; `--up auto`; `--align pca --layout sphere`),
one `sync --encoders hog --pools mean` into a fresh store, then: upright (the axis the setting turned to
+y is the file's true up; for a fixed `--up y`, the share of y-up files), p@5 and NN accuracy over the
collection, and how often an object's nearest neighbour shares its file convention (the failure seen on
a real OBJ library: neighbours by export convention, not by shape). The up-axis model was fitted on these
same meshes (in sample): benchmarks/orientation.py gives the held-out figures.
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
sys.path.insert(0, str(HERE))

from orientation import to_convention  # noqa: E402  (the up-axis benchmark's helper)

SETTINGS = {"--up y": {"up": "y"}, "--up auto": {"up": "auto"},
            "--align pca --layout sphere --views 12": {"align": "pca", "layout": "sphere", "views": 12}}


def main() -> None:
    from m3d.evaluate import ranking_metrics
    from m3d.meshio import load_mesh, write_off
    from m3d.pipeline import SyncOptions, sync
    from m3d.render import ViewSettings, posed
    from m3d.store import open_session

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "lpsb")
    ap.add_argument("--labels", type=Path, default=HERE / "lpsb_up_labels.txt")
    ap.add_argument("--conventions", default="x,y,z")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated keys of SETTINGS")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/conventions-<conventions>.json")
    args = ap.parse_args()
    conventions = args.conventions.split(",")
    out = args.out or HERE / "results" / f"conventions-{''.join(conventions)}.json"
    rows = [line.split() for line in args.labels.read_text().splitlines() if line and not line.startswith("#")]
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="m3d-conventions-"))
    truth: dict[str, str] = {}  # path in the tree -> the axis that is up in that file
    try:
        for cls, ident, up in rows:
            convention = conventions[int(rng.integers(len(conventions)))]
            rel = f"{cls}/{ident}.off"
            write_off(posed(load_mesh(args.data / rel), to_convention(up, convention)), work / "tree" / rel)
            truth[rel] = convention
        results = {"meshes": len(truth), "conventions": conventions, "seed": args.seed,
                   "load_average_at_start": os.getloadavg()[0],
                   "files_per_convention": {c: sum(v == c for v in truth.values()) for c in conventions},
                   "settings": {}}
        for key in args.settings.split(","):
            store = work / f"store-{len(results['settings'])}"
            start = time.perf_counter()
            with open_session(store) as session:
                sync(session, work / "tree", SyncOptions(encoders=("hog",), pools=("mean",),
                                                         view=ViewSettings(**SETTINGS[key])))
                records = list(session.vectors.records("m3d_hog_mean", vectors=True))
            seconds = time.perf_counter() - start
            paths = [r.payload["path"] for r in records]
            vectors = np.stack([r.vector for r in records]).astype(np.float32)
            labels = np.array([r.payload["class"] for r in records])
            file_conv = np.array([truth[p] for p in paths])
            metrics = ranking_metrics(vectors, labels)
            sims = vectors @ vectors.T
            np.fill_diagonal(sims, -np.inf)
            nn = sims.argmax(axis=1)
            ups = [(r.payload.get("pose") or {}).get("up") for r in records]
            row = {"objects": len(records), "p@5": float(np.nanmean(metrics["precision"][5])),
                   "nn": float(np.nanmean(metrics["nn"])),
                   "nn_same_convention": float(np.mean(file_conv[nn] == file_conv)),
                   "sync_seconds": round(seconds, 1)}
            if SETTINGS[key].get("align", "none") == "none":
                row["upright"] = float(np.mean([u == truth[p] for u, p in zip(ups, paths)]))
            results["settings"][key] = row
            print(key, json.dumps(row), flush=True)
        results["load_average_at_end"] = os.getloadavg()[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
