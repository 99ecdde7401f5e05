"""m3d end to end on a big tree (not a test): first sync, no-op re-sync, one-file re-sync, eval and a cold
query, each as its own `m3d` process with its wall time and peak memory (main process and render workers).

    nice python benchmarks/resync.py --data ../shared/datasets/lpsb --factor 30     # 11,400 objects

The tree is `--factor` symlinks per LPSB mesh (distinct paths = distinct objects, the same real meshes);
the one-file change replaces one link by a copy of another mesh. `--src DIR` runs another checkout's
source (e.g. main before a change) on the same tree, for a ratio measured under the same load.
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
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--encoders", default="hog")
    parser.add_argument("--pools", default="mean,max,attn")
    parser.add_argument("--src", type=Path, default=HERE.parent / "src", help="the m3d source to run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "resync")
    parser.add_argument("--sync-args", default="", help="extra sync options, e.g. '--index-threshold 0'")
    parser.add_argument("--keep", action="store_true", help="keep the tree and store (their folder is printed)")
    parser.add_argument("--reuse", type=Path, help="a folder kept by --keep: skip the first sync, time the rest again")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.reuse or Path(tempfile.mkdtemp(prefix="m3d-resync-"))
    env = {"PYTHONPATH": str(args.src.resolve()), "HF_HUB_OFFLINE": "1"}
    try:
        tree = (work / f"{args.data.name}-x{args.factor}" if args.reuse
                else scaled_tree(args.data.resolve(), args.factor, work))
        store = work / "store"
        m3d = [sys.executable, "-m", "m3d.cli"]
        sync = [*m3d, "sync", str(tree), "--store", str(store), "--encoders", args.encoders, "--pools", args.pools,
                "--json", *args.sync_args.split()]
        steps = {} if args.reuse else {"sync": run_mode("sync", sync, None, env, stdout_json=True)}
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
        rows = [f"objects: {objects:,} ({args.factor} x {args.data.name}), encoders {args.encoders}, pools {args.pools}, "
                f"source {args.src}, store {store_mb:.0f} MB ({allocated_mb:.0f} MB allocated)", "",
                "| step | wall s | CPU s | peak main MB (private) | peak workers MB | load before/after |",
                "|---|---:|---:|---:|---:|---|"]
        for name, step in steps.items():
            rows.append(f"| {name} | {step['wall_s']:.1f} | {step['cpu_s']:.1f} | {step['peak_main_mb']:.0f} "
                        f"({step['peak_main_private_mb']:.0f}) | {step['peak_workers_mb']:.0f} | "
                        f"{step['loadavg_before']:.1f} / {step['loadavg_after']:.1f} |")
        ratio = steps["one-file re-sync"]["wall_s"] / steps["no-op re-sync"]["wall_s"]
        cpu = steps["one-file re-sync"]["cpu_s"] / steps["no-op re-sync"]["cpu_s"]
        rows.append(f"\none-file / no-op re-sync: {ratio:.2f}x wall, {cpu:.2f}x CPU")
        tag = f"x{args.factor}-{args.src.resolve().parent.name}" + ("-reuse" if args.reuse else "")
        kept = ("added", "updated", "unchanged", "seconds", "index_seconds")  # of a sync's summary
        raw = {k: {kk: vv for kk, vv in v.items() if kk != "result"}
               | {kk: v["result"][kk] for kk in kept if isinstance(v["result"], dict) and kk in v["result"]}
               for k, v in steps.items()}
        raw |= {"objects": objects, "store_mb": store_mb, "store_allocated_mb": allocated_mb}
        (args.out / f"{tag}.json").write_text(json.dumps(raw, indent=2))
        (args.out / f"{tag}.md").write_text("\n".join(rows) + "\n")
        print("\n".join(rows))
    finally:
        if args.keep or args.reuse:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
