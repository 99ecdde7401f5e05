"""ModelNet40 at full size on one GPU machine, in one command: sync, encoder-only floor, exact side.

    python benchmarks/gpu.py --out OUT                      # 12,311 objects, CLIP B/32 + DINOv2 B/14
    python benchmarks/gpu.py --objects 200 --tiny --out OUT # a dry run on any CPU (tiny random encoders)

What it does, in order:
  1. meshes: a ModelNet-layout tree of --objects symlinks (<class>/train/<name>.off) cycling over the
     meshes under --data; without --data (or where it does not exist) it first generates --distinct
     meshes with m3d's sample generator, so it runs on a machine that has no dataset at all;
  2. encoders: random-weight checkpoints built from the real configs (openai/clip-vit-base-patch32's
     ViT-B/32 and facebook/dinov2-base's ViT-B/14: the same compute as the pretrained weights; --tiny
     for the test-sized ones), saved once under --cache and loaded through m3d's own load_encoder(path);
  3. the floor: real views of a few of these meshes pushed through each encoder and nothing else
     (benchmarks/phases.py encode-only, warmed up);
  4. the sync: `m3d sync` through the library (local engine, defaults otherwise: 8 views, 224 px, 3
     pools, so 2 x 3 = 6 collections) into a fresh embedded store, while a sampler reads GPU utilisation
     and memory (pynvml, else nvidia-smi) and CPU utilisation every --interval seconds;
  5. the exact side: every object queries each collection's FAISS rows (k=10), on the GPU where a
     faiss-gpu build sees one (m3d.connector.exact.knn), else on the CPU.

It prints a markdown report and writes gpu.json (every raw figure) and gpu.md to --out.
The first GPU session's command (wheels and GL libraries carried, see docs/scale.md):

    for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; python3 -m pip install -q --no-index --no-deps \\
      --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # tests/checkpoints.py: the random checkpoints
sys.path.insert(0, str(HERE))  # phases.py: the encoder-only floor
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random checkpoints from disk; no hub on the GPU machine

MODELNET40 = 12_311  # objects in ModelNet40 (9,843 train + 2,468 test)
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "lpsb"


# -- sampling the machine ----------------------------------------------------------------------------
class Sampler(threading.Thread):
    """GPU utilisation and memory (pynvml, else nvidia-smi, else none) and CPU utilisation, every interval."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.rows, self._halt = interval, [], threading.Event()
        self.source = "none"
        self._nvml = self._smi = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            self.source = "pynvml"
        except Exception:  # no NVML library, no GPU, no pynvml: try the command line tool
            if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
                self._smi = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                             "-i", "0"]
                self.source = "nvidia-smi"

    def _gpu(self) -> tuple[float, float] | None:
        if self._nvml:
            nvml, handle = self._nvml
            return (float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
        if self._smi:
            out = subprocess.run(self._smi, capture_output=True, text=True).stdout.split(",")
            return (float(out[0]), float(out[1])) if len(out) == 2 else None
        return None

    def run(self) -> None:
        import psutil

        start = time.perf_counter()
        psutil.cpu_percent()
        while not self._halt.wait(self.interval):
            gpu = self._gpu()
            self.rows.append({"t": time.perf_counter() - start, "cpu": psutil.cpu_percent(),
                              **({"gpu": gpu[0], "gpu_mb": gpu[1]} if gpu else {})})

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return summarise_samples(self.rows, self.source)


def summarise_samples(rows: list[dict], source: str) -> dict:
    import numpy as np

    out: dict = {"source": source, "samples": len(rows)}
    for key in ("gpu", "cpu"):
        values = np.array([r[key] for r in rows if key in r])
        if len(values):
            out[key] = {"mean": float(values.mean()), "p50": float(np.median(values)), "max": float(values.max()),
                        "busy_share": float((values > 0).mean())}
    mem = [r["gpu_mb"] for r in rows if "gpu_mb" in r]
    if mem:
        out["gpu_mb_max"] = float(max(mem))
    return out


class Marks(logging.Handler):
    """When the sync's own log lines came: the plan line (preparation over) and the first write."""

    def __init__(self, start: float):
        super().__init__(logging.INFO)
        self.start, self.at = start, {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for key, prefix in (("plan_done_s", "plan:"), ("first_write_s", "upserted")):
            if key not in self.at and message.startswith(prefix):
                self.at[key] = time.perf_counter() - self.start


class Ticker:
    """A progress line on stderr every few seconds (a long run on a remote machine shows it is moving)."""

    def __init__(self, every: float = 10.0):
        self.every, self.last, self.start = every, 0.0, time.perf_counter()

    def __call__(self, done: int, total: int, report) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every or done == total:
            self.last = now
            print(f"[gpu] {done:,}/{total:,} objects, {now - self.start:.0f} s", file=sys.stderr, flush=True)


# -- set-up --------------------------------------------------------------------------------------------
def source_meshes(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The meshes to cycle over: --data where it exists, else --distinct generated ones."""
    if args.data and Path(args.data).is_dir():
        return Path(args.data).resolve(), f"{args.data}"
    from m3d.samples import SHAPES, write_samples

    root = work / "generated"
    per_class = max(1, -(-args.distinct // len(SHAPES)))
    write_samples(root, per_class=per_class, seed=0)
    return root, f"m3d samples: {per_class * len(SHAPES)} generated meshes ({len(SHAPES)} shapes)"


def build_tree(source: Path, dest: Path, objects: int) -> dict:
    """dest/<class>/train/<stem>_cNNNNN<suffix>: `objects` symlinks cycling over the source meshes
    (distinct relative paths are distinct objects to m3d)."""
    import numpy as np

    from m3d.dataset import discover
    from m3d.meshio import load_mesh

    files, _ = discover(source)
    if not files:
        raise SystemExit(f"no meshes under {source}")
    for i in range(objects):
        f = files[i % len(files)]
        folder = dest / f.label / "train"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{Path(f.rel_path).stem}_c{i:05d}{f.path.suffix}").symlink_to(f.path.resolve())
    faces = [len(load_mesh(f.path).faces) for f in files[: min(len(files), 64)]]
    return {"objects": objects, "distinct_meshes": len(files), "classes": len({f.label for f in files}),
            "faces_median": float(np.median(faces)), "faces_mean": float(np.mean(faces))}


def checkpoints(cache: Path, tiny: bool) -> dict[str, Path]:
    from checkpoints import save_random_checkpoint

    size = "tiny" if tiny else "base"
    out = {}
    for family in ("clip", "dinov2"):
        path = cache / f"random-{size}" / family
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            print(f"[gpu] saving a random {size} {family} checkpoint to {path}", file=sys.stderr, flush=True)
            save_random_checkpoint(family, path, size=size)
        out[family] = path
    return out


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "loadavg": os.getloadavg()[0], "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from m3d.connector.exact import faiss_gpus

    import faiss

    info["faiss"] = faiss.__version__
    info["faiss_gpus"] = faiss_gpus()
    # which GL the render workers get (NVIDIA's EGL or Mesa's llvmpipe), asked in a process of its own
    probe = ("import moderngl; c = moderngl.create_standalone_context(backend='egl'); "
             "print(c.info['GL_RENDERER']); c.release()")
    gl = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    info["gl_renderer"] = gl.stdout.strip() or f"unavailable: {gl.stderr.strip().splitlines()[-1:]}"
    return info


# -- the measurements ------------------------------------------------------------------------------------
def floor(tree: Path, specs: list[str], args: argparse.Namespace) -> dict:
    import phases

    images = args.floor_images or 8 * min(args.objects, 1024)
    ns = argparse.Namespace(data=tree, per_class=None, limit=args.sample_objects, size=args.size,
                            sample_objects=args.sample_objects, encoder=specs, images=images)
    result = phases.encode_only(ns)
    per = {name: {**row, "images_per_s": images / row["seconds"]} for name, row in result["encoders"].items()}
    # every image goes through every encoder: the floor for the sync is the sum of their times
    encode_s = sum(row["seconds"] for row in per.values())
    return {"images": images, "seconds": encode_s, "images_per_s": images / encode_s, "encoders": per,
            "load_s": result["load_s"]}


def run_sync(tree: Path, store: Path, specs: list[str], args: argparse.Namespace) -> dict:
    from m3d.pipeline import SyncOptions, sync
    from m3d.store import open_session

    options = SyncOptions(encoders=tuple(specs), pools=tuple(args.pools.split(",")), workers=args.workers,
                          batch_size=args.batch_size)
    logger = logging.getLogger("m3d")
    start = time.perf_counter()
    marks = Marks(start)
    logger.addHandler(marks)
    logger.setLevel(logging.INFO)
    sampler = Sampler(args.interval)
    sampler.start()
    try:
        with open_session(store) as session:
            report = sync(session, tree, options, progress=Ticker())
    finally:
        samples = sampler.stop()
        logger.removeHandler(marks)
    wall = time.perf_counter() - start
    embedded = report.added + report.updated
    images = embedded * options.view.views
    stream = report.stream_objects_per_s and embedded / report.stream_objects_per_s  # the engine's run, start to last write
    index = sum(report.index_seconds.values())
    stages = report.stages
    return {
        "wall_s": wall, "embedded": embedded, "skipped": len(report.skipped), "collections": report.collections,
        "objects_per_s": embedded / wall, "stream_objects_per_s": report.stream_objects_per_s,
        "images": images, "encode_images_per_s_busy": images / stages.encode if stages.encode else 0.0,
        "encode_images_per_s_stream": images / stream if stream else 0.0,
        "phases_s": {"before_stream": marks.at.get("plan_done_s"), "first_write": marks.at.get("first_write_s"),
                     "stream": stream, "index_build": index,
                     "after_stream": wall - (marks.at.get("plan_done_s") or 0) - stream},
        "stages_busy_s": {"render": stages.render, "encode": stages.encode, "write": stages.write,
                          "render_workers": stages.render_workers, "encode_workers": stages.encode_workers},
        "stages_busy_per_worker_s": {"render": stages.render / max(stages.render_workers, 1),
                                     "encode": stages.encode / max(stages.encode_workers, 1), "write": stages.write},
        "bottleneck": stages.bottleneck(), "workers": report.workers, "resources": report.resources,
        "index_seconds": report.index_seconds, "orientation": report.orientation, "utilisation": samples,
    }


def exact_side(store: Path, k: int = 10) -> dict:
    """Every stored vector queries its own collection's FAISS rows: the exact side's largest job (eval)."""
    import numpy as np

    from m3d.connector.exact import faiss_gpus
    from m3d.store import open_session

    out = {"device": "gpu" if faiss_gpus() else "cpu", "k": k, "collections": {}}
    with open_session(store) as session:
        for name in session.collections():
            index = session.exact(name)
            queries = np.ascontiguousarray(index.vectors)
            start = time.perf_counter()
            index.search(queries, k)
            spent = time.perf_counter() - start
            out["collections"][name] = {"queries": len(queries), "dim": int(queries.shape[1]), "seconds": spent,
                                        "queries_per_s": len(queries) / spent}
    return out


# -- the report ---------------------------------------------------------------------------------------------
def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(r: dict) -> str:
    m, s, fl, ex = r["machine"], r["sync"], r["floor"], r["exact"]
    util = s["utilisation"]
    gpu, cpu = util.get("gpu", {}), util.get("cpu", {})
    lines = [
        f"## gpu.py: {s['embedded']:,} objects x {r['views']} views, {len(s['collections'])} collections "
        f"({r['encoders']} encoders)",
        "",
        f"machine: {m.get('gpu', 'no GPU')}, {m['cpus']} CPUs, torch {m['torch']}, GL {m['gl_renderer']}, "
        f"faiss {m['faiss']} ({m['faiss_gpus']} GPUs), load {m['loadavg']:.1f} before",
        f"meshes: {r['tree']['objects']:,} objects over {r['tree']['distinct_meshes']} distinct meshes "
        f"({r['source']}; median {r['tree']['faces_median']:,.0f} faces)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| sync wall (s) | {_f(s['wall_s'])} |",
        f"| objects/s (whole sync) | {_f(s['objects_per_s'])} |",
        f"| objects/s (stream: first render to last write) | {_f(s['stream_objects_per_s'])} |",
        f"| encode images/s in the sync (images / encode busy s) | {_f(s['encode_images_per_s_busy'])} |",
        f"| encode images/s in the sync (images / stream s) | {_f(s['encode_images_per_s_stream'])} |",
        f"| encoder-only floor images/s (all encoders, {fl['images']:,} images) | {_f(fl['images_per_s'])} |",
        f"| stream rate / floor | {_f(s['encode_images_per_s_stream'] / fl['images_per_s'], 2)} |",
        f"| GPU utilisation mean / p50 / max (% , {util['source']}) | {_f(gpu.get('mean'))} / {_f(gpu.get('p50'))} / {_f(gpu.get('max'))} |",
        f"| GPU memory max (MB) | {_f(util.get('gpu_mb_max'), 0)} |",
        f"| CPU utilisation mean / max (%) | {_f(cpu.get('mean'))} / {_f(cpu.get('max'))} |",
        "",
        "Where the time goes (seconds):",
        "",
        "| phase | s |",
        "|---|---:|",
        f"| before the stream (discover, model load, up-axis evidence, plan) | {_f(s['phases_s']['before_stream'], 2)} |",
        f"| stream (render -> encode -> write, overlapped) | {_f(s['phases_s']['stream'], 2)} |",
        f"| after the stream (FAISS save, index build, report) | {_f(s['phases_s']['after_stream'], 2)} |",
        f"| of which index build (all collections) | {_f(s['phases_s']['index_build'], 2)} |",
        "",
        f"Stage busy seconds (render summed over {s['stages_busy_s']['render_workers']} workers; "
        f"bottleneck: **{s['bottleneck']}**):",
        "",
        "| stage | busy s | per worker s |",
        "|---|---:|---:|",
        *(f"| {k} | {_f(s['stages_busy_s'][k], 2)} | {_f(s['stages_busy_per_worker_s'][k], 2)} |"
          for k in ("render", "encode", "write")),
        "",
        "Encoder-only floor per encoder:",
        "",
        "| encoder | device | precision | batch | images/s |",
        "|---|---|---|---:|---:|",
        *(f"| {name} | {e['device']} | {e['precision']} | {e['batch_size']} | {_f(e['images_per_s'])} |"
          for name, e in fl["encoders"].items()),
        "",
        f"Exact side (FAISS on the {ex['device']}, every object queries its collection, k={ex['k']}):",
        "",
        "| collection | queries x dim | s | queries/s |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {c['queries']:,} x {c['dim']} | {_f(c['seconds'], 3)} | {_f(c['queries_per_s'], 0)} |"
          for name, c in ex["collections"].items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=MODELNET40)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="meshes to cycle over (default: the dev set where "
                    "it exists, else generated ones)")
    ap.add_argument("--distinct", type=int, default=600, help="generated meshes when --data is not there")
    ap.add_argument("--tiny", action="store_true", help="test-sized random encoders (a dry run on a CPU)")
    ap.add_argument("--pools", default="mean,max,attn")
    ap.add_argument("--size", type=int, default=224, help="the floor's render size (the sync uses its default)")
    ap.add_argument("--workers", type=int, help="render workers (default: the sync's own choice)")
    ap.add_argument("--batch-size", type=int, help="images per encoder call (default: the encoder's own)")
    ap.add_argument("--floor-images", type=int, help="images through each encoder for the floor "
                    "(default: 8 x min(objects, 1024))")
    ap.add_argument("--sample-objects", type=int, default=16, help="meshes rendered for the floor's images")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between utilisation samples")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "m3d-gpu-cache"),
                    help="where the random checkpoints are saved once")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="[gpu] %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the sync's INFO lines feed Marks, not the console
        handler.setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="m3d-gpu-") as tmp:
        work = Path(tmp)
        result: dict = {"args": vars(args), "machine": machine(), "views": 8}
        print(f"[gpu] machine: {json.dumps(result['machine'])}", file=sys.stderr, flush=True)
        source, result["source"] = source_meshes(args, work)
        tree = work / "modelnet40-sized"
        result["tree"] = build_tree(source, tree, args.objects)
        ckpt = checkpoints(Path(args.cache), args.tiny)
        specs = [str(ckpt["clip"]), str(ckpt["dinov2"])]
        result["encoders"] = "tiny random" if args.tiny else "random CLIP ViT-B/32 + DINOv2 ViT-B/14"
        print("[gpu] encoder-only floor ...", file=sys.stderr, flush=True)
        result["floor"] = floor(tree, specs, args)
        print(f"[gpu] sync of {args.objects:,} objects ...", file=sys.stderr, flush=True)
        result["sync"] = run_sync(tree, work / "store", specs, args)
        result["exact"] = exact_side(work / "store")
    (out / "gpu.json").write_text(json.dumps(result, indent=2, default=str))
    report = markdown(result)
    (out / "gpu.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
