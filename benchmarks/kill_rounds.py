"""Random kill -9 rounds: each round kills real `m3d sync` processes 1-3 times at random moments (from
0.3 s, in start-up, up to past the end), then lets the same command finish, and compares the store with
one uninterrupted run (same ids, payloads, vectors; FAISS in step; `m3d check` clean). After each kill
it counts the processes the sync had started that are still alive 10 s later (orphans). Prints one line
per round and a summary.

    python benchmarks/kill_rounds.py --data ../shared/datasets/lpsb --rounds 20 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ARGS = ["--encoders", "hog", "--pools", "mean,attn", "--workers", "2", "--batch-size", "8"]


def make_tree(data: Path, root: Path, per_class: int, classes: list[str]) -> Path:
    for label in classes:
        (root / label / "train").mkdir(parents=True)
        for src in sorted((data / label).glob("*.off"), key=lambda p: int(p.stem))[:per_class]:
            (root / label / "train" / src.name).symlink_to(src)
    return root


def run(tree: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "m3d.cli", "sync", str(tree), "--store", str(store), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def snapshot(store: Path) -> dict:
    from m3d.store import open_session

    with open_session(store, create=False) as session:
        out = {}
        for name in session.collections():
            records = {r.id: r for r in session.vectors.records(name, vectors=True)}
            out[name] = {
                "payloads": {pid: (r.payload["path"], r.payload["content_hash"], r.payload["pipeline"])
                             for pid, r in records.items()},
                "vectors": {pid: r.vector for pid, r in records.items()},
                "faiss": sorted(session.exact(name).ids),
                "check_ok": all(row["ok"] for row in session.check()),
            }
        return out


def same(a: dict, b: dict) -> str | None:
    if a.keys() != b.keys():
        return f"collections {sorted(a)} != {sorted(b)}"
    for name in a:
        if a[name]["payloads"] != b[name]["payloads"]:
            return f"{name}: payloads differ"
        if a[name]["faiss"] != b[name]["faiss"] or not b[name]["check_ok"]:
            return f"{name}: FAISS or check differs"
        for pid, vec in a[name]["vectors"].items():
            if not np.allclose(vec, b[name]["vectors"][pid], atol=1e-6):
                return f"{name}: vector {pid} differs"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/lpsb")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=4)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="m3d-kill-"))
    try:
        tree = make_tree(args.data, base / "meshes", args.per_class, ["Airplane", "Chair", "Cup"])
        started = time.monotonic()
        ref = run(tree, base / "reference")
        assert ref.wait() == 0, ref.stderr.read()
        full_s = time.monotonic() - started
        reference = snapshot(base / "reference")
        print(f"uninterrupted sync: {full_s:.1f} s; load {os.getloadavg()[0]:.1f}")
        failures = kills = orphans = 0
        for round_no in range(1, args.rounds + 1):
            store = base / f"round{round_no}"
            moments = []
            for _ in range(rng.randint(1, 3)):
                proc = run(tree, store)
                moment = rng.uniform(0.3, full_s * 1.1)
                try:
                    proc.wait(timeout=moment)  # finished before the kill: nothing to kill
                except subprocess.TimeoutExpired:
                    started = psutil.Process(proc.pid).children(recursive=True)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    _, alive = psutil.wait_procs(started, timeout=10)
                    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
                    orphans += len(alive)
                    for p in alive:
                        p.kill()
                    moments.append(f"{moment:.1f}s ({len(started)} children, {len(alive)} left)")
            final = run(tree, store)
            code = final.wait()
            diff = f"exit {code}: {final.stderr.read().strip()[-200:]}" if code != 0 else same(reference, snapshot(store))
            failures += diff is not None
            print(f"round {round_no}: killed at {', '.join(moments) or '(finished first)'} -> "
                  f"{'MATCHES the uninterrupted store' if diff is None else 'DIFFERS: ' + diff}")
            shutil.rmtree(store, ignore_errors=True)
        print(f"{args.rounds} rounds, {kills} kill -9s, {orphans} orphaned processes, {failures} rounds differing; "
              f"load {os.getloadavg()[0]:.1f}")
        return 1 if failures or orphans else 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
