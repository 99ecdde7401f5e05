"""m3d end to end on big trees (not a test): first sync, re-syncs, one-file re-sync, eval and a cold
query, each as its own `m3d` process with its wall time and peak memory (main process and render workers).

    nice python benchmarks/resync.py --data ../shared/datasets/lpsb --factor 1,10,30   # 380 / 3,800 / 11,400

Each tree is `--factor` symlinks per LPSB mesh (distinct paths = distinct objects, the same real meshes);
the one-file change replaces one link by a copy of another mesh. The first re-sync after the first sync
is timed, then the no-op re-sync the table reports (the same work when the first sync was made by this
code; the first one writes the sync manifest when the store was made by older code, see --reuse). Prints
issue 19's table (one row per factor, the issue's "before" rows and the first release's figures beside
it) and each factor's per-step details. `--src DIR` runs another checkout's source (e.g. main before a
change) on the same tree, for a ratio measured under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import run_mode, scaled_tree  # noqa: E402  (the benchmark's own sampler and tree builder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--factor", default="10", help="copies of each mesh; several: 1,10,30")
    parser.add_argument("--encoders", default="hog")
    parser.add_argument("--pools", default="mean,max,attn")
    parser.add_argument("--src", type=Path, default=HERE.parent / "src", help="the m3d source to run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "resync")
    parser.add_argument("--sync-args", default="", help="extra sync options, e.g. '--index-threshold 0'")
    parser.add_argument("--keep", action="store_true", help="keep the tree and store (their folder is printed)")
    parser.add_argument("--reuse", type=Path, help="a folder kept by --keep: skip the first sync, time the rest again")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    factors = [int(f) for f in args.factor.split(",")]
    if args.reuse and len(factors) > 1:
        raise SystemExit("--reuse takes one --factor (the one the kept folder was made with)")
    rows = [run_factor(args, factor) for factor in factors]
    table = ["| objects | first sync s | peak RSS MB | no-op re-sync s | one-file re-sync s | eval s | cold query s |"
             " load |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    table += [row for row, _ in rows]
    table += [f"| {n} (issue 19 before) | " + " | ".join(before) + " | 3-5 |" for n, before in BEFORE.items()]
    table += [f"| {n} (first release) | " + " | ".join(first) + " | |" for n, first in FIRST_RELEASE.items()]
    text = "\n".join([f"source {args.src}, encoders {args.encoders}, pools {args.pools} {args.sync_args}".rstrip(),
                      "", *table, "", *(line for _, details in rows for line in ("", *details))])
    tag = "x" + "-".join(map(str, factors)) + f"-{args.src.resolve().parent.name}" + ("-reuse" if args.reuse else "")
    (args.out / f"{tag}.md").write_text(text + "\n")
    print(text)


#: Issue 19's "What was measured" rows (same trees and options, this kind of machine, load 3-5 for the
#: first two) and the first release's figures it quotes, printed beside each run for comparison.
BEFORE = {"380": ("26.4", "490", "5.1", "3.9", "1.8", "2.8"), "3,800": ("253", "666", "4.1", "5.2", "9.4", "2.2"),
          "11,400": ("584", "1,262", "11.7", "11.4", "47", "3.5")}
FIRST_RELEASE = {"11,400": ("504", "", "7.2", "", "", "1.9")}


def run_factor(args: argparse.Namespace, factor: int) -> tuple[str, list[str]]:
    """One tree: every step timed; returns the table row and the per-step details."""
    work = args.reuse or Path(tempfile.mkdtemp(prefix=f"m3d-resync-x{factor}-"))
    env = {"PYTHONPATH": str(args.src.resolve()), "HF_HUB_OFFLINE": "1"}
    try:
        tree = (work / f"{args.data.name}-x{factor}" if args.reuse
                else scaled_tree(args.data.resolve(), factor, work))
        store = work / "store"
        m3d = [sys.executable, "-m", "m3d.cli"]
        sync = [*m3d, "sync", str(tree), "--store", str(store), "--encoders", args.encoders, "--pools", args.pools,
                "--json", *args.sync_args.split()]
        steps = {} if args.reuse else {"sync": run_mode("sync", sync, None, env, stdout_json=True)}
        steps["first re-sync"] = run_mode("re-sync", sync, None, env, stdout_json=True)
        steps["no-op re-sync"] = run_mode("no-op", sync, None, env, stdout_json=True)
        victim = next(p for p in sorted(tree.rglob("*.off")) if p.is_symlink())  # one not changed before
        other = sorted(tree.rglob("*.off"))[-1]
        victim.unlink()
        shutil.copyfile(other.resolve(), victim)
        steps["one-file re-sync"] = run_mode("one-file", sync, None, env, stdout_json=True)
        steps["eval"] = run_mode("eval", [*m3d, "eval", "--store", str(store), "--json"], None, env, stdout_json=True)
        steps["cold query"] = run_mode("query", [*m3d, "query", str(other), "--store", str(store), "--json"], None, env,
                                       stdout_json=True)
        stats = [f.stat() for f in store.rglob("*") if f.is_file()]
        store_mb = sum(st.st_size for st in stats) / 2**20
        allocated_mb = sum(st.st_blocks * 512 for st in stats) / 2**20  # preallocated files are sparse
        objects = steps["no-op re-sync"]["result"]["discovered"]
        details = [f"objects: {objects:,} ({factor} x {args.data.name}), store {store_mb:.0f} MB ({allocated_mb:.0f} MB "
                   "allocated)", "", "| step | wall s | CPU s | peak MB (all processes) | peak main MB (private) | "
                   "peak workers MB | load before/after | planned from manifest |", "|---|---:|---:|---:|---:|---:|---|---|"]
        for name, step in steps.items():
            result = step["result"] if isinstance(step["result"], dict) else {}
            manifest = ", ".join(result.get("from_manifest", [])) if "from_manifest" in result else ""
            details.append(f"| {name} | {step['wall_s']:.1f} | {step['cpu_s']:.1f} | {step['peak_rss_mb']:.0f} | "
                           f"{step['peak_main_mb']:.0f} ({step['peak_main_private_mb']:.0f}) | {step['peak_workers_mb']:.0f}"
                           f" | {step['loadavg_before']:.1f} / {step['loadavg_after']:.1f} | {manifest} |")
        ratio = steps["one-file re-sync"]["wall_s"] / steps["no-op re-sync"]["wall_s"]
        cpu = steps["one-file re-sync"]["cpu_s"] / steps["no-op re-sync"]["cpu_s"]
        details.append(f"\none-file / no-op re-sync: {ratio:.2f}x wall, {cpu:.2f}x CPU")
        if "sync" in steps and isinstance(steps["sync"]["result"], dict):
            details.append(f"first sync index build s: {steps['sync']['result'].get('index_seconds')}")
        first = steps.get("sync")
        loads = sorted(v for step in steps.values() for v in (step["loadavg_before"], step["loadavg_after"]))
        row = (f"| {objects:,} | {first['wall_s']:.1f} | {first['peak_rss_mb']:.0f} | " if first else f"| {objects:,} | | | ") + (
            f"{steps['no-op re-sync']['wall_s']:.2f} | {steps['one-file re-sync']['wall_s']:.2f} | "
            f"{steps['eval']['wall_s']:.1f} | {steps['cold query']['wall_s']:.1f} | {loads[0]:.0f}-{loads[-1]:.0f} |")
        tag = f"x{factor}-{args.src.resolve().parent.name}" + ("-reuse" if args.reuse else "")
        kept = ("added", "updated", "unchanged", "seconds", "index_seconds", "from_manifest")  # of a sync's summary
        raw = {k: {kk: vv for kk, vv in v.items() if kk != "result"}
               | {kk: v["result"][kk] for kk in kept if isinstance(v["result"], dict) and kk in v["result"]}
               for k, v in steps.items()}
        raw |= {"objects": objects, "store_mb": store_mb, "store_allocated_mb": allocated_mb}
        (args.out / f"{tag}.json").write_text(json.dumps(raw, indent=2))
        print("\n".join([row, *details]), file=sys.stderr, flush=True)
        return row, details
    finally:
        if args.keep or args.reuse:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
