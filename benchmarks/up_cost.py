"""What the up decision costs a first sync (not a test): the same first sync with the default --up auto
and with --up y, back to back, alternating (ABAB...), each in a fresh process and a fresh store.

    python benchmarks/up_cost.py                        # lpsb (the dev set), hog, 3 pools, 2 rounds
    python benchmarks/up_cost.py --rounds 3 --data ../shared/datasets/psb-train

Per run: the wall time of `m3d sync DIR --encoders hog --json` (start-up included), the summary's
objects/s (the whole sync) and its up rules (how many files the plan measured, how many objects the
render workers decided on their own evidence) and the seconds the plan spent on the up rules (measured
inside the same run, so load drift between runs does not enter it). The cost is the median auto run
over the median y run, and the plan's up seconds over the auto run's sync seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "lpsb")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "up-cost.json")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="m3d-upcost-"))
    runs = []
    try:
        for round_ in range(args.rounds):
            for up in ("auto", "y"):
                store = work / f"store-{round_}-{up}"
                load = os.getloadavg()[0]
                start = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "m3d.cli", "sync", str(args.data), "--store", str(store),
                                      "--encoders", "hog", "--up", up, "--json"], env=env, capture_output=True,
                                     text=True, check=True).stdout
                wall = time.perf_counter() - start
                report = json.loads(out)
                o = report.get("orientation") or {}
                row = {"up": up, "round": round_, "wall_s": round(wall, 2), "sync_s": round(report["seconds"], 2),
                       "objects_per_s": round(report["objects_per_s"], 2), "load_before": round(load, 1),
                       "load_after": round(os.getloadavg()[0], 1), "measured_in_plan": o.get("measured"),
                       "plan_up_s": o.get("seconds"),
                       "rules": {sfx: {k: g.get(k) for k in ("up", "agree", "sampled", "objects")}
                                 for sfx, g in (o.get("formats") or {}).items()}}
                runs.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(store, ignore_errors=True)
        med = {up: statistics.median(r["wall_s"] for r in runs if r["up"] == up) for up in ("auto", "y")}
        result = {"data": str(args.data), "runs": runs, "median_wall_s": med, "auto_over_y": med["auto"] / med["y"]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
