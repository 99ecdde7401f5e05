"""The m3d-side measurements of the benchmark, each run by bench.py in its own process (so its peak
memory and CPU time are its own). One JSON object out per phase.

    python phases.py render-stream --data DIR [--per-class N] [--workers W] --out out.json
    python phases.py render-cost   --data DIR --per-class 1 --sizes 224 1024 --out out.json
    python phases.py encode-only   --data DIR --encoder SPEC ... --images N --out out.json
    python phases.py encoder-cost  --data DIR --encoder SPEC ... --batch-sizes 1 8 32 128 --out out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _files(args: argparse.Namespace):
    from m3d.dataset import discover

    files, _ = discover(args.data, per_class=args.per_class, limit=args.limit)
    return files


def _sample_views(args: argparse.Namespace, objects: int) -> np.ndarray:
    """Real renders of the first `objects` meshes (views stacked): what the encoders are fed."""
    from m3d.meshio import load_mesh
    from m3d.render import ViewSettings, create_renderer

    renderer = create_renderer(ViewSettings(size=args.size))
    try:
        return np.concatenate([renderer.render(load_mesh(f.path)) for f in _files(args)[:objects]])
    finally:
        renderer.close()


def render_stream(args: argparse.Namespace) -> dict:
    """The sync's render stage alone (load, hash, render, blank check in the worker processes), after
    the up-axis evidence pass the sync runs first (timed as its own line): the workers get the plan's
    decisions, as in a sync, instead of measuring evidence themselves."""
    from m3d.meshio import DEFAULT_MAX_FACES
    from m3d.pipeline.engines.local import auto_workers, render_stream as stream
    from m3d.pipeline.plan import Plan, RenderSpec, Task, plan_orientation
    from m3d.render import ViewSettings
    from m3d.store import open_session

    import torch  # only to ask whether the sync would encode on a GPU (then it leaves a core to feed it)

    files = _files(args)
    spec = RenderSpec(ViewSettings(size=args.size, renderer=args.renderer, up=args.up), DEFAULT_MAX_FACES)
    workers = auto_workers(not torch.cuda.is_available()) if args.workers is None else args.workers
    plan = Plan([Task(f, frozenset()) for f in files], [], spec)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, open_session(Path(tmp) / "store") as session:  # an empty store
        plan_orientation(plan, files, {}, {}, (os.cpu_count() or 1) if args.workers is None else args.workers,
                         session, files[0].dataset)  # as sync() runs it
    evidence_s = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    views = objects = failed = 0
    busy = 0.0
    for item in stream(plan.tasks, spec, workers):
        busy += item.seconds
        if item.views is None:
            failed += 1
        else:
            objects += 1
            views += len(item.views)
    seconds = time.perf_counter() - start
    main_cpu = time.process_time() - cpu_start  # receiving the views from the workers (pipes + unpickling)
    return {"objects": objects, "failed": failed, "views": views, "workers": workers, "seconds": seconds,
            "views_per_s": views / seconds, "objects_per_s": objects / seconds, "worker_busy_s": busy,
            "main_cpu_ms_per_object": 1e3 * main_cpu / max(objects + failed, 1), "up": args.up,
            "evidence_s": evidence_s, "evidence_objects_per_s": len(files) / evidence_s if evidence_s > 0 else None}


def render_cost(args: argparse.Namespace) -> dict:
    """Warm milliseconds per view of each m3d renderer at each size (meshes preloaded, one renderer)."""
    from m3d.meshio import load_mesh
    from m3d.render import ViewSettings, create_renderer

    meshes = [load_mesh(f.path) for f in _files(args)]
    out: dict = {"meshes": len(meshes), "mean_faces": float(np.mean([len(m.faces) for m in meshes]))}
    for name in args.renderers:
        rows = {}
        for size in args.sizes:
            renderer = create_renderer(ViewSettings(size=size, renderer=name))
            try:
                renderer.render(meshes[0])  # warm-up: shader compilation, buffers
                start = time.perf_counter()
                views = sum(len(renderer.render(m)) for m in meshes)
                spent = time.perf_counter() - start
            finally:
                renderer.close()
            rows[str(size)] = {"ms_per_view": 1e3 * spent / views, "views": views}
        out[name] = rows
    if "moderngl" in args.renderers:
        import moderngl

        ctx = moderngl.create_standalone_context(backend="egl")
        out["gl_renderer"] = ctx.info["GL_RENDERER"]
        ctx.release()
    return out


def encode_only(args: argparse.Namespace) -> dict:
    """The floor: `--images` real views pushed through each encoder, in its own batch size, nothing else."""
    import torch

    from m3d.encoders import load_encoder

    sample = _sample_views(args, args.sample_objects)
    start = time.perf_counter()
    encoders = [load_encoder(spec) for spec in args.encoder]
    load_s = time.perf_counter() - start
    per_encoder = {}
    start = time.perf_counter()
    for spec, encoder in zip(args.encoder, encoders):
        encoder.encode(sample[:encoder.batch_size])  # warm-up: CUDA context, kernels chosen, allocator grown
        if encoder.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, args.images, encoder.batch_size):  # batches cycle through the sample (flat memory)
            rows = np.arange(i, min(i + encoder.batch_size, args.images)) % len(sample)
            vectors = encoder.encode(sample[rows])
        if vectors.device.type == "cuda":
            torch.cuda.synchronize()
        per_encoder[encoder.name] = {"seconds": time.perf_counter() - t, "batch_size": encoder.batch_size,
                                     "device": encoder.device, "precision": encoder.precision}
    seconds = time.perf_counter() - start
    return {"images": args.images, "seconds": seconds, "load_s": load_s, "encoders": per_encoder,
            "torch_threads": torch.get_num_threads()}


def encoder_cost(args: argparse.Namespace) -> dict:
    """Images/s of each encoder at each batch size, preprocessing included (uint8 views in, vectors out)."""
    import torch

    from m3d.encoders import load_encoder

    sample = _sample_views(args, 4)
    if args.save_sample:  # the reference's encoder table encodes the same views
        np.save(args.save_sample, sample)
    out = {}
    for spec in args.encoder:
        rows = {}
        encoder = load_encoder(spec, batch_size=max(args.batch_sizes))  # encode() splits above this only
        encoder.encode(sample[:1])  # warm-up
        for bs in args.batch_sizes:
            n = int(math.ceil(max(bs, args.min_images) / bs) * bs)
            images = np.ascontiguousarray(sample[np.arange(n) % len(sample)])
            start = time.perf_counter()
            for i in range(0, n, bs):
                vectors = encoder.encode(images[i:i + bs])
            if vectors.device.type == "cuda":
                torch.cuda.synchronize()
            spent = time.perf_counter() - start
            rows[str(bs)] = {"images": n, "seconds": spent, "images_per_s": n / spent}
        out[encoder.name] = {"device": encoder.device, "precision": encoder.precision, "rows": rows}
    return out


PHASES = {"render-stream": render_stream, "render-cost": render_cost, "encode-only": encode_only,
          "encoder-cost": encoder_cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=sorted(PHASES))
    ap.add_argument("--data", required=True)
    ap.add_argument("--per-class", type=int)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--renderer", default="moderngl")
    ap.add_argument("--up", default="auto", help="render-stream: the sync's --up (auto runs its evidence pass first)")
    ap.add_argument("--renderers", nargs="+", default=["moderngl", "raycast"])
    ap.add_argument("--workers", type=int)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 1024])
    ap.add_argument("--encoder", action="append", default=[])
    ap.add_argument("--images", type=int, default=0)
    ap.add_argument("--sample-objects", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--min-images", type=int, default=8)
    ap.add_argument("--save-sample", help="encoder-cost: also save the views it encodes (.npy)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    Path(args.out).write_text(json.dumps(PHASES[args.phase](args), indent=2))


if __name__ == "__main__":
    main()
