"""Qdrant at scale (not a test): insert rate, index build, memory and disk per point, single-query
latency and recall@10 against FAISS, per size, dimension and setting, through m3d's own store classes
(connector.edge.EdgeStore for qdrant-edge, connector.exact.ExactIndex for FAISS).

    nice python benchmarks/scale.py --sizes 10000,100000 --dims 512,768 --out benchmarks/results/scale

Vectors: no 512/768-d m3d vectors exist on this machine at scale (no CLIP/DINOv2 weights; the dev set
has 380 objects), so they are synthetic and say so: a mixture of 2,000 Gaussian clusters on the unit
sphere (centre ~ N(0, I) normalised, plus N(0, I/dim) noise, normalised again), seeded; the 200 queries
are fresh draws from the same mixture, never stored points. Each (size, dim, setting) runs in its own
process so its memory is its own; `uptime` load is recorded beside every row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = {  # name -> (IndexSettings kwargs, ef values searched)
    "exact": ({"index_threshold": 10**9}, [None]),
    "hnsw": ({"index_threshold": 0, "hnsw_m": 16, "hnsw_ef_construct": 100}, [16, 32, 64, 128, 256]),
    "hnsw+int8": ({"index_threshold": 0, "hnsw_m": 16, "hnsw_ef_construct": 100, "quantization": "int8"},
                  [16, 32, 64, 128, 256]),
    # the 1M row: original vectors on disk, the graph built over int8 vectors (cheaper on 2 cores)
    "hnsw+int8+disk": ({"index_threshold": 0, "hnsw_m": 16, "hnsw_ef_construct": 64, "quantization": "int8",
                        "on_disk": True}, [32, 64, 128, 256]),
}
QUERIES = 200
K = 10
BATCH = 1024


def mixture(n: int, dim: int, seed: int, clusters: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 1 + n)
    out = centres[rng.integers(0, clusters, size=n)]
    for lo in range(0, n, 65536):  # in chunks (the same draws as one call): no n x dim float64 copy
        rows = out[lo:lo + 65536]
        rows += rng.normal(size=rows.shape).astype(np.float32) / np.sqrt(dim)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def reset_peak() -> None:
    """Forget the peak RSS so far (Linux): what follows is measured without the data's generation."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    """Peak RSS since the last reset_peak (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PrivatePeak:
    """Peak private memory (RssAnon) of this process while a block runs, sampled every 0.1 s."""

    def __enter__(self) -> "PrivatePeak":
        import threading

        self.mb, self._halt = 0.0, threading.Event()

        def sample() -> None:
            while not self._halt.wait(0.1):
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.mb = max(self.mb, int(line.split()[1]) / 1024)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self._thread.join()


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def disk_mb(path: Path, allocated: bool = False) -> float:
    """Apparent size, or the blocks really allocated (preallocated and grown files are sparse)."""
    files = [f.stat() for f in path.rglob("*") if f.is_file()]
    return sum(st.st_blocks * 512 if allocated else st.st_size for st in files) / 2**20


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def via_session(n: int, dim: int, setting: str, queries_n: int = QUERIES) -> dict:
    """m3d's own write path at scale: Session.upsert (Qdrant + the FAISS file, batch by batch), finish
    (index build + FAISS commit), then a fresh session that must trust the saved FAISS file (generation
    + sampled rows) and answers recall@10 of Qdrant against it, and runs `m3d check` (Session.check)."""
    from m3d.connector import IndexSettings, SearchSettings
    from m3d.store import open_session

    kwargs, efs = SETTINGS[setting]
    vectors = mixture(n, dim, seed=0)
    queries = mixture(QUERIES, dim, seed=0)[:queries_n]
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(n)]
    name = "m3d_scale_mean"
    root = Path(tempfile.mkdtemp(prefix="m3d-scale-", dir=os.environ.get("SCALE_TMP")))
    row = {"n": n, "dim": dim, "setting": f"{setting} (m3d Session)", "load_before": load()}
    reset_peak()  # the benchmark's own copy of the data stays counted (n * dim * 4 bytes), its making not
    try:
        with open_session(root / "store") as session:
            session.vectors.ensure_collection(name, dim, IndexSettings(**kwargs))
            before = rss_mb()
            start = time.perf_counter()
            for lo in range(0, n, BATCH):
                hi = min(lo + BATCH, n)
                session.upsert(name, ids[lo:hi], vectors[lo:hi], [{"class": f"c{i % 20}"} for i in range(lo, hi)])
            row["insert_s"] = time.perf_counter() - start
            row["insert_per_s"] = n / row["insert_s"]
            start = time.perf_counter()
            row["index_build_s"] = session.finish(name)
            row["finish_s"] = time.perf_counter() - start
            row["engine_rss_bytes_per_point"] = max(0.0, rss_mb() - before) * 2**20 / n
            row["indexed"] = session.vectors.index_info(name).indexed
        row["peak_rss_write_mb"] = peak_mb()
        del vectors
        reset_peak()
        row["disk_bytes_per_point"] = disk_mb(root / "store" / "qdrant") * 2**20 / n
        row["disk_allocated_bytes_per_point"] = disk_mb(root / "store" / "qdrant", allocated=True) * 2**20 / n
        row["faiss_disk_allocated_bytes_per_point"] = disk_mb(root / "store" / "faiss", allocated=True) * 2**20 / n
        with open_session(root / "store", create=False) as session:
            start = time.perf_counter()
            saved = (root / "store" / "faiss" / f"{name}.faiss").stat()
            exact = session.exact(name)  # trusted as saved, or rebuilt (a new file) when not
            row["faiss_open_s"] = time.perf_counter() - start
            now = (root / "store" / "faiss" / f"{name}.faiss").stat()
            row["faiss_rebuilt"] = (now.st_ino, now.st_mtime_ns) != (saved.st_ino, saved.st_mtime_ns)
            row["faiss_trusted"] = session.vectors.generation(name) == exact.generation
            row["qdrant_points"], row["faiss_points"] = session.vectors.count(name), len(exact)
            lat = []
            truth = []
            for q in queries:
                t = time.perf_counter()
                truth.append(exact.search(q[None], K)[1][0])
                lat.append((time.perf_counter() - t) * 1000)
            row["faiss_p50_ms"], row["faiss_p99_ms"] = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
            row["sweep"] = []
            for ef in efs:
                params = SearchSettings(hnsw_ef=ef)
                session.vectors.search(name, queries[:5], K, params=params)  # warm
                lat, hits = [], 0
                for q, t_ids in zip(queries, truth):
                    t = time.perf_counter()
                    answer = session.vectors.search(name, q[None], K, params=params)[0]
                    lat.append((time.perf_counter() - t) * 1000)
                    hits += len({h.id for h in answer} & set(t_ids))
                row["sweep"].append({"hnsw_ef": ef, "recall@10": hits / (K * len(queries)),
                                     "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))})
            row["peak_rss_query_mb"] = peak_mb()
            reset_peak()
            start = time.perf_counter()
            with PrivatePeak() as private:
                checked = session.check()
            row["check_s"] = time.perf_counter() - start
            row["check_ok"] = all(r["ok"] for r in checked)
            row["peak_rss_check_mb"], row["peak_private_check_mb"] = peak_mb(), private.mb
        row["data_mb"] = n * dim * 4 / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row["load_after"] = load()
    return row


def one(n: int, dim: int, setting: str) -> dict:
    """Build one collection and measure it (runs in its own process)."""
    import faiss

    from m3d.connector import IndexSettings, SearchSettings
    from m3d.connector.edge import EdgeStore
    from m3d.connector.exact import ExactIndex

    faiss.omp_set_num_threads(1)
    kwargs, efs = SETTINGS[setting]
    vectors = mixture(n, dim, seed=0)
    queries = mixture(QUERIES, dim, seed=0)[:QUERIES]  # same centres, other draws
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(n)]
    payloads = [{"class": f"c{i % 20}"} for i in range(n)]
    root = Path(tempfile.mkdtemp(prefix="m3d-scale-", dir=os.environ.get("SCALE_TMP")))
    row = {"n": n, "dim": dim, "setting": setting, "load_before": load()}
    try:
        store = EdgeStore(root / "qdrant")
        store.ensure_collection("m3d_scale", dim, IndexSettings(**kwargs))
        before = rss_mb()
        start = time.perf_counter()
        for lo in range(0, n, BATCH):
            store.upsert("m3d_scale", ids[lo:lo + BATCH], vectors[lo:lo + BATCH], payloads[lo:lo + BATCH])
        store.flush()
        row["insert_s"] = time.perf_counter() - start
        row["insert_per_s"] = n / row["insert_s"]
        start = time.perf_counter()
        store.optimize("m3d_scale")
        row["index_build_s"] = time.perf_counter() - start
        row["engine_rss_bytes_per_point"] = max(0.0, rss_mb() - before) * 2**20 / n  # the engine's share
        info = store.index_info("m3d_scale")
        row["indexed"] = info.indexed
        row["disk_bytes_per_point"] = disk_mb(root / "qdrant") * 2**20 / n
        exact = ExactIndex(ids, vectors)
        start = time.perf_counter()
        truth = exact.search(queries, K)[1]
        row["faiss_batch_ms_per_query"] = (time.perf_counter() - start) * 1000 / QUERIES
        lat = []
        for q in queries:
            t = time.perf_counter()
            exact.search(q[None], K)
            lat.append((time.perf_counter() - t) * 1000)
        row["faiss_p50_ms"], row["faiss_p99_ms"] = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
        row["sweep"] = []
        for ef in efs:
            params = SearchSettings(hnsw_ef=ef)
            store.search("m3d_scale", queries[:5], K, params=params)  # warm
            lat, hits = [], 0
            for q, t_ids in zip(queries, truth):
                t = time.perf_counter()
                answer = store.search("m3d_scale", q[None], K, params=params)[0]
                lat.append((time.perf_counter() - t) * 1000)
                hits += len({h.id for h in answer} & set(t_ids))
            row["sweep"].append({"hnsw_ef": ef, "recall@10": hits / (K * len(queries)),
                                 "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))})
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the data's making included
        row["data_mb"] = vectors.nbytes / 2**20
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row["load_after"] = load()
    return row


def table(rows: list[dict]) -> str:
    out = ["| points | dim | setting | insert /s | index build s | disk B/pt | RSS B/pt | hnsw_ef | recall@10 | p50 ms | p99 ms | FAISS p50 / p99 ms | load (1/5/15 min) |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        for i, s in enumerate(r["sweep"]):
            head = (f"| {r['n']:,} | {r['dim']} | {r['setting']} | {r['insert_per_s']:,.0f} | {r['index_build_s']:.1f} | "
                    f"{r['disk_bytes_per_point']:,.0f} | {r['engine_rss_bytes_per_point']:,.0f} |") if i == 0 else "| | | | | | | |"
            faiss = f"{r['faiss_p50_ms']:.2f} / {r['faiss_p99_ms']:.2f}" if i == 0 else ""
            out.append(f"{head} {s['hnsw_ef'] or 'exact'} | {s['recall@10']:.4f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                       f"{faiss} | {r['load_before'] if i == 0 else ''} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dims", default="512,768")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    parser.add_argument("--queries", type=int, default=QUERIES, help="queries per row (--session)")
    parser.add_argument("--session", action="store_true",
                        help="write through m3d's Session (Qdrant + FAISS file) and check from a fresh one")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # n,dim,setting: run one in this process
    args = parser.parse_args()
    if args.one:
        n, dim, setting = args.one.split(",")
        run = via_session(int(n), int(dim), setting, args.queries) if args.session else one(int(n), int(dim), setting)
        print(json.dumps(run))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in map(int, args.sizes.split(",")):
        for dim in map(int, args.dims.split(",")):
            for setting in args.settings.split(","):
                done = subprocess.run([sys.executable, __file__, "--one", f"{n},{dim},{setting}",
                                       *(["--session", "--queries", str(args.queries)] if args.session else [])],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{n} x {dim} {setting}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr)
                (args.out / "scale.json").write_text(json.dumps(rows, indent=2))
                (args.out / "scale.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
