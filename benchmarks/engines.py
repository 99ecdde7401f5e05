"""The sync's engines against each other, on real meshes (weight-free hog encoder, fresh stores).

    python benchmarks/engines.py overhead --data ../shared/datasets/lpsb --repeat 3
    python benchmarks/engines.py scaling  --data ../shared/datasets/lpsb --copies 2 --workers 1 2

overhead: local vs Ray (one local Ray started once, its start timed apart) on the same tree, runs
  alternated so both see the same load; the Ray engine's fixed cost is timed on a one-object sync.
scaling:  the Ray engine with 1, 2, ... render actors on a larger tree (the dataset COPIES times, as
  symlinks in a temp dir), to show the render stage scaling.
Per run: wall, objects/s (the report's: from the engine's start to the last write), stage busy seconds,
the driver's CPU seconds, and the load average before and after. One JSON object per run on stdout
and in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _sync(tree: Path, engine: str, workers: int | None, limit: int | None = None) -> dict:
    from m3d.pipeline import SyncOptions, sync
    from m3d.store import open_session

    with tempfile.TemporaryDirectory(prefix="m3d-bench-") as store:
        load = os.getloadavg()[0]
        start, cpu = time.perf_counter(), time.process_time()
        with open_session(Path(store)) as session:
            report = sync(session, tree, SyncOptions(encoders=("hog",), workers=workers, engine=engine), limit=limit)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    embedded = report.added + report.updated
    return {"engine": engine, "workers": report.workers, "objects": embedded, "wall_s": wall,
            "objects_per_s": report.objects_per_s, "driver_cpu_ms_per_object": 1e3 * cpu / max(embedded, 1),
            "render_busy_ms_per_object": 1e3 * report.stages.render / max(embedded, 1),
            "encode_busy_ms_per_object": 1e3 * report.stages.encode / max(embedded, 1),
            "write_busy_ms_per_object": 1e3 * report.stages.write / max(embedded, 1),
            "bottleneck": report.stages.bottleneck(), "resources": report.resources,
            "load_before": load, "load_after": os.getloadavg()[0]}


def _ray_init() -> float:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    return time.perf_counter() - start


def _emit(rows: list, row: dict) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def overhead(args: argparse.Namespace) -> dict:
    rows: list[dict] = []
    ray_start = _ray_init()
    fixed = [_sync(args.data, "ray", None, limit=1) for _ in range(args.repeat)]
    for row in fixed:
        _emit(rows, {**row, "mode": "ray, one object"})
    for _ in range(args.repeat):
        _emit(rows, {**_sync(args.data, "local", None), "mode": "local"})
        _emit(rows, {**_sync(args.data, "ray", None), "mode": "ray"})
    med = {m: statistics.median(r["objects_per_s"] for r in rows if r["mode"] == m) for m in ("local", "ray")}
    return {"ray_init_s": ray_start, "ray_one_object_wall_s": statistics.median(r["wall_s"] for r in fixed),
            "median_objects_per_s": med, "ray_over_local": med["ray"] / med["local"], "runs": rows}


def scaling(args: argparse.Namespace) -> dict:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="m3d-bench-tree-") as tmp:
        tree = Path(tmp) / f"{args.data.name}_x{args.copies}"
        for src in sorted(args.data.rglob("*.off")):
            rel = src.relative_to(args.data)
            for k in range(args.copies):
                dest = tree / rel.parent / f"{src.stem}_r{k}{src.suffix}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(src.resolve())
        ray_start = _ray_init()
        for _ in range(args.repeat):
            for workers in args.workers:
                _emit(rows, {**_sync(tree, "ray", workers), "mode": f"ray, {workers} render actors"})
    med = {w: statistics.median(r["objects_per_s"] for r in rows if r["workers"] == w) for w in args.workers}
    return {"ray_init_s": ray_start, "median_objects_per_s": med,
            "speedup": {w: med[w] / med[args.workers[0]] for w in args.workers}, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["overhead", "scaling"])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.data = args.data.resolve()
    result = {"mode": args.mode, "cpus": os.cpu_count(), "argv": sys.argv[1:],
              **{"overhead": overhead, "scaling": scaling}[args.mode](args)}
    summary = {k: v for k, v in result.items() if k != "runs"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
