"""What the index build at the end of a sync costs (not a test): N unit vectors of D dims written to an
embedded Qdrant collection as a sync writes them (batches of 512), then `optimize()` (the HNSW graph,
and quantized vectors where asked), timed, with this process's peak memory (private, and resident in all)
while writing and while building.

    python benchmarks/index_cost.py --points 11400 --dim 1764 [--quantization int8] [--threshold 10000]

Vectors: real hog vectors (a store's collection, --from STORE/COLLECTION, repeated to N) or random
unit vectors. Each setting runs in its own process (memory peaks are per process).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb() -> tuple[int, int]:
    """(RssAnon, VmRSS) now, in MB: private memory, and that plus the memory-mapped store files resident."""
    found = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                found[key] = int(value.split()[0]) // 1024
    return found["RssAnon"], found["VmRSS"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=11_400)
    ap.add_argument("--dim", type=int, default=1764)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--threshold", type=int, default=10_000)
    ap.add_argument("--from", dest="source", type=Path, help="STORE/COLLECTION to take real vectors from")
    args = ap.parse_args()

    from m3d.connector import IndexSettings
    from m3d.connector.edge import EdgeStore

    if args.source:
        from m3d.store import open_session

        with open_session(args.source.parent, create=False) as session:
            real = np.stack([r.vector for r in session.vectors.records(args.source.name, vectors=True)])
        vectors = np.resize(real, (args.points, real.shape[1])).astype(np.float32)
    else:
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((args.points, args.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    peak = {"anon": 0, "rss": 0}

    def sample() -> None:
        while True:
            anon, rss = rss_mb()
            peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        store = EdgeStore(Path(tmp) / "qdrant")
        name = "m3d_bench_index"
        store.ensure_collection(name, vectors.shape[1], IndexSettings(index_threshold=args.threshold,
                                                                      quantization=args.quantization))
        ids = [f"00000000-0000-5000-8000-{i:012d}" for i in range(len(vectors))]
        start = time.perf_counter()
        for i in range(0, len(vectors), 512):
            store.upsert(name, ids[i:i + 512], vectors[i:i + 512], [{"class": "x"}] * len(ids[i:i + 512]))
        store.flush()
        write_s = time.perf_counter() - start
        time.sleep(0.1)
        before = dict(peak)
        base = dict(zip(("anon", "rss"), rss_mb()))
        peak.update(base)
        cpu = time.process_time()
        start = time.perf_counter()
        built = store.optimize(name)
        build_s, build_cpu = time.perf_counter() - start, time.process_time() - cpu
        time.sleep(0.1)
        info = store.index_info(name)
        store.close()
    print(json.dumps({"points": len(vectors), "dim": int(vectors.shape[1]), "quantization": args.quantization,
                      "threshold": args.threshold, "vectors": "real" if args.source else "random",
                      "write_s": round(write_s, 2), "built": built, "build_s": round(build_s, 2),
                      "build_cpu_s": round(build_cpu, 2), "mb_before_build": base, "peak_mb_writing": before,
                      "peak_mb_building": peak, "build_extra_rss_mb": peak["rss"] - base["rss"],
                      "build_extra_anon_mb": peak["anon"] - base["anon"], "indexed": info.indexed, "state": info.state,
                      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
