"""The reference pipeline m3d grew from, written plainly, so the benchmark can compare in one run.

Its shape: per object, load the mesh (Open3D's reader), render each view one at a time with Open3D's
OffscreenRenderer (Open3D 0.19, EGL_PLATFORM=surfaceless on CPU), turn the views into PIL images,
run each encoder's Hugging Face image processor on them, one forward pass per object per encoder,
pool the views (mean / max / attention), and upsert one point per object into each collection of an
embedded Qdrant (qdrant-edge). No batching across objects, no overlap between stages.

Runs in its own environment (benchmarks/.venv-ref: torch, open3d==0.19.0, transformers, pillow,
qdrant-edge-py) because Open3D 0.20's OffscreenRenderer is Vulkan-only and stalls on Mesa. When the
OffscreenRenderer cannot start, it says so and renders with a plain per-view numpy z-buffer instead.

    python reference.py pipeline --files files.json --encoder clip=DIR --encoder dinov2=DIR --store DIR --out out.json
    python reference.py render-cost --files files.json --sizes 224 1024 --out out.json
    python reference.py encoder-cost --encoder clip=DIR --batch-sizes 1 8 32 128 --out out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("EGL_PLATFORM", "surfaceless")  # Open3D 0.19 headless EGL on Mesa

import numpy as np

VIEWS, ELEVATION, FOV = 8, 20.0, 35.0
NAMESPACE = uuid.UUID("6f1d8a52-3c1e-5b7a-9a7e-2f4c0d9e8b11")


# -- meshes -------------------------------------------------------------------------------------
def read_off(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A plain OFF reader (also the 'OFF490 518 0' header defect): vertices (V,3), triangles (F,3)."""
    tokens = Path(path).read_text(errors="replace").split("\n")
    lines = [ln.split("#")[0].strip() for ln in tokens]
    lines = [ln for ln in lines if ln]
    head = lines[0]
    if head.upper().startswith("OFF") and len(head) > 3:
        counts, rest = head[3:].split(), lines[1:]
    else:
        counts, rest = lines[1].split(), lines[2:]
    nv, nf = int(counts[0]), int(counts[1])
    vertices = np.array([ln.split()[:3] for ln in rest[:nv]], dtype=np.float64)
    faces = []
    for ln in rest[nv:nv + nf]:
        idx = [int(t) for t in ln.split()]
        k = idx[0]
        poly = idx[1:1 + k]
        faces.extend([poly[0], poly[i], poly[i + 1]] for i in range(1, k - 1))  # fan-triangulate
    return vertices, np.array(faces, dtype=np.int64).reshape(-1, 3)


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Open3D's own reader (what the reference used with its renderer); the plain reader when it fails."""
    import open3d as o3d

    mesh = o3d.io.read_triangle_mesh(path)
    if len(mesh.triangles):
        return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.triangles, dtype=np.int64)
    return read_off(path)


def normalise(vertices: np.ndarray) -> np.ndarray:
    """Centre on the bounding-box centre, scale so the farthest vertex is at distance 1."""
    v = vertices - (vertices.min(0) + vertices.max(0)) / 2
    return v / max(np.linalg.norm(v, axis=1).max(), 1e-12)


def ring(views: int = VIEWS, elevation: float = ELEVATION) -> list[np.ndarray]:
    """Camera eyes on a horizontal ring, distance chosen so the unit sphere (+5%) fills the view."""
    d = 1.05 / math.sin(math.radians(FOV) / 2)
    el = math.radians(elevation)
    return [np.array([d * math.cos(el) * math.sin(a), d * math.sin(el), d * math.cos(el) * math.cos(a)])
            for a in np.arange(views) * 2 * math.pi / views]


# -- renderers ----------------------------------------------------------------------------------
class Open3DRenderer:
    """Open3D's OffscreenRenderer (Filament over EGL), one view per render_to_image call."""

    name = "open3d-0.19-offscreen"

    def __init__(self, size: int):
        import open3d as o3d
        from open3d.visualization import rendering

        self.o3d = o3d
        self.size = size
        self.renderer = rendering.OffscreenRenderer(size, size)
        self.renderer.scene.set_background([1.0, 1.0, 1.0, 1.0])
        self.renderer.scene.view.set_post_processing(False)  # no tone mapping: a white background stays white
        self.material = rendering.MaterialRecord()
        self.material.shader = "defaultLit"
        self.material.base_color = [0.8, 0.8, 0.8, 1.0]
        self.name = f"open3d-{o3d.__version__}-offscreen"

    def render_view(self, eye: np.ndarray) -> np.ndarray:
        self.renderer.setup_camera(FOV, [0.0, 0.0, 0.0], eye.tolist(), [0.0, 1.0, 0.0])
        return np.asarray(self.renderer.render_to_image())

    def set_mesh(self, vertices: np.ndarray, faces: np.ndarray) -> None:
        o3d = self.o3d
        mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(faces))
        mesh.compute_vertex_normals()
        self.renderer.scene.clear_geometry()
        self.renderer.scene.add_geometry("mesh", mesh, self.material)


class ZBufferRenderer:
    """Fallback when the OffscreenRenderer cannot start: a plain numpy z-buffer, one view at a time."""

    name = "numpy-zbuffer (fallback)"

    def __init__(self, size: int):
        self.size = size

    def set_mesh(self, vertices: np.ndarray, faces: np.ndarray) -> None:
        self.v, self.f = vertices, faces

    def render_view(self, eye: np.ndarray) -> np.ndarray:
        s = self.size
        back = eye / np.linalg.norm(eye)
        right = np.cross([0.0, 1.0, 0.0], back)
        right /= np.linalg.norm(right)
        up = np.cross(back, right)
        cam = (self.v - eye) @ np.stack([right, up, back]).T
        t = math.tan(math.radians(FOV) / 2)
        px = (cam[:, 0] / -cam[:, 2] / t + 1) * s / 2
        py = (1 - cam[:, 1] / -cam[:, 2] / t) * s / 2
        depth = np.full((s, s), np.inf)
        image = np.full((s, s), 255.0)
        tri = self.v[self.f]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        shade = 255 * 0.82 * (0.22 + 0.78 * np.abs(n @ back))
        for k, (a, b, c) in enumerate(self.f):  # one triangle at a time, its bounding box rasterised
            xs, ys, zs = px[[a, b, c]], py[[a, b, c]], -cam[[a, b, c], 2]
            x0, x1 = max(int(xs.min()), 0), min(int(xs.max()) + 1, s)
            y0, y1 = max(int(ys.min()), 0), min(int(ys.max()) + 1, s)
            if x0 >= x1 or y0 >= y1:
                continue
            gx, gy = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
            det = (ys[1] - ys[2]) * (xs[0] - xs[2]) + (xs[2] - xs[1]) * (ys[0] - ys[2])
            if abs(det) < 1e-12:
                continue
            w0 = ((ys[1] - ys[2]) * (gx - xs[2]) + (xs[2] - xs[1]) * (gy - ys[2])) / det
            w1 = ((ys[2] - ys[0]) * (gx - xs[2]) + (xs[0] - xs[2]) * (gy - ys[2])) / det
            w2 = 1 - w0 - w1
            inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
            z = w0 * zs[0] + w1 * zs[1] + w2 * zs[2]
            region = depth[y0:y1, x0:x1]
            closer = inside & (z < region)
            region[closer] = z[closer]
            image[y0:y1, x0:x1][closer] = shade[k]
        return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2)


def warm_up(renderer) -> None:
    """One render of a tetrahedron, so shader compilation is set-up time, not the first object's."""
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64) / math.sqrt(3)
    renderer.set_mesh(v, np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]]))
    renderer.render_view(ring()[0])


def make_renderer(size: int):
    """The OffscreenRenderer when it runs here; otherwise the fallback, with the reason printed."""
    try:
        import open3d as o3d

        if o3d.__version__.startswith("0.20"):
            raise RuntimeError("Open3D 0.20's OffscreenRenderer is Vulkan-only and stalls on Mesa")
        return Open3DRenderer(size)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback, and say so
        print(f"reference: OffscreenRenderer unavailable ({exc}); using {ZBufferRenderer.name}", file=sys.stderr)
        return ZBufferRenderer(size)


# -- encoders -----------------------------------------------------------------------------------
class Encoder:
    """A Hugging Face checkpoint with its own image processor (PIL images in, pixel_values out)."""

    def __init__(self, name: str, directory: str):
        import torch
        import transformers
        from transformers import AutoImageProcessor

        self.name = name
        config = json.loads((Path(directory) / "config.json").read_text())
        self.kind = config["model_type"]
        cls = transformers.CLIPVisionModelWithProjection if self.kind.startswith("clip") else transformers.Dinov2Model
        transformers.logging.set_verbosity_error()  # load reports of the unused CLIP text tower
        transformers.logging.disable_progress_bar()
        self.processor = AutoImageProcessor.from_pretrained(directory)
        self.model = cls.from_pretrained(directory).eval()
        self.torch = torch

    def preprocess(self, images: list) -> object:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def forward(self, pixels) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(pixel_values=pixels)
            emb = out.image_embeds if self.kind.startswith("clip") else out.last_hidden_state[:, 0]
        return emb.float().numpy()


def pool(name: str, views: np.ndarray) -> np.ndarray:
    """(views, dim) -> one unit vector: mean, max, or softmax attention with the mean as the query."""
    if name == "mean":
        v = views.mean(0)
    elif name == "max":
        v = views.max(0)
    else:
        q = views.mean(0)
        scores = views @ q / math.sqrt(views.shape[1])
        w = np.exp(scores - scores.max())
        v = (w[:, None] * views).sum(0) / w.sum()
    return v / max(np.linalg.norm(v), 1e-12)


def parse_encoders(specs: list[str]) -> list[tuple[str, str]]:
    return [tuple(s.split("=", 1)) for s in specs]  # type: ignore[misc]


# -- commands -----------------------------------------------------------------------------------
def run_pipeline(args: argparse.Namespace) -> dict:
    import qdrant_edge as q
    from PIL import Image

    files = json.loads(Path(args.files).read_text())
    t0 = time.perf_counter()
    renderer = make_renderer(args.size)
    warm_up(renderer)
    encoders = [Encoder(name, d) for name, d in parse_encoders(args.encoder)]
    pools = ("mean", "max", "attn")
    store = Path(args.store)
    shards = {}
    for enc in encoders:
        dim = enc.forward(enc.preprocess([Image.new("RGB", (args.size, args.size), "white")])).shape[1]
        for p in pools:
            config = q.EdgeConfig(vectors=q.EdgeVectorParams(size=dim, distance=q.Distance.Cosine))
            path = store / f"ref_{enc.name}_{p}"
            path.mkdir(parents=True, exist_ok=True)
            shards[(enc.name, p)] = q.EdgeShard.create(str(path), config)
    setup_s = time.perf_counter() - t0
    stages = {"load": 0.0, "render": 0.0, "preprocess": 0.0, "forward": 0.0, "pool": 0.0, "upsert": 0.0}
    eyes = ring(args.views)
    t_loop = time.perf_counter()
    done = 0
    for item in files:
        t = time.perf_counter()
        v, f = load(item["path"])
        v = normalise(v)
        renderer.set_mesh(v, f)
        t1 = time.perf_counter()
        stages["load"] += t1 - t
        images = [Image.fromarray(renderer.render_view(eye)) for eye in eyes]  # one view at a time
        t2 = time.perf_counter()
        stages["render"] += t2 - t1
        pid = str(uuid.uuid5(NAMESPACE, item["rel_path"]))
        for enc in encoders:
            t = time.perf_counter()
            pixels = enc.preprocess(images)
            t1 = time.perf_counter()
            per_view = enc.forward(pixels)  # one forward pass per object per encoder
            t2 = time.perf_counter()
            vectors = {p: pool(p, per_view) for p in pools}
            t3 = time.perf_counter()
            for p, vec in vectors.items():  # one upsert per object per collection
                point = q.Point(pid, vec.tolist(), {"class": item["label"], "path": item["rel_path"]})
                shards[(enc.name, p)].update(q.UpdateOperation.upsert_points([point]))
            t4 = time.perf_counter()
            stages["preprocess"] += t1 - t
            stages["forward"] += t2 - t1
            stages["pool"] += t3 - t2
            stages["upsert"] += t4 - t3
        done += 1
    for shard in shards.values():
        shard.flush()
    loop_s = time.perf_counter() - t_loop
    counts = {f"{e}_{p}": s.count(q.CountRequest(exact=True)) for (e, p), s in shards.items()}
    for shard in shards.values():
        shard.close()
    total = time.perf_counter() - t0
    return {"renderer": renderer.name, "objects": done, "images": done * args.views, "setup_s": setup_s,
            "loop_s": loop_s, "seconds": total, "objects_per_s": done / total, "stages": stages, "points": counts}


def run_render_cost(args: argparse.Namespace) -> dict:
    """Warm milliseconds per view, per size, over the given meshes (one view per call)."""
    files = json.loads(Path(args.files).read_text())
    meshes = [(normalise(v), f) for v, f in (load(it["path"]) for it in files)]
    out = {}
    name = None
    for size in args.sizes:
        renderer = make_renderer(size)
        name = renderer.name
        eyes = ring(args.views)
        renderer.set_mesh(*meshes[0])
        renderer.render_view(eyes[0])  # warm-up (shader compilation)
        spent, views = 0.0, 0
        for v, f in meshes:
            renderer.set_mesh(v, f)
            t = time.perf_counter()
            for eye in eyes:
                renderer.render_view(eye)
            spent += time.perf_counter() - t
            views += len(eyes)
        out[str(size)] = {"ms_per_view": 1e3 * spent / views, "views": views}
        del renderer
    return {"renderer": name, "sizes": out}


def run_render_only(args: argparse.Namespace) -> dict:
    """Views per second of the reference render loop alone (load + render every view), for the ratio."""
    files = json.loads(Path(args.files).read_text())
    t0 = time.perf_counter()
    renderer = make_renderer(args.size)
    warm_up(renderer)
    eyes = ring(args.views)
    setup = time.perf_counter() - t0
    t = time.perf_counter()
    views = 0
    for item in files:
        v, f = load(item["path"])
        renderer.set_mesh(normalise(v), f)
        for eye in eyes:
            renderer.render_view(eye)
            views += 1
    spent = time.perf_counter() - t
    return {"renderer": renderer.name, "views": views, "objects": len(files), "seconds": spent, "setup_s": setup,
            "views_per_s": views / spent}


def run_encoder_cost(args: argparse.Namespace) -> dict:
    """Images/s at each batch size, HF processor on PIL images included (the reference's way)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pool_images = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(8)]
    if args.images:
        pool_images = [Image.fromarray(a) for a in np.load(args.images)]
    out = {}
    for name, directory in parse_encoders(args.encoder):
        enc = Encoder(name, directory)
        enc.forward(enc.preprocess(pool_images[:1]))  # warm-up
        rows = {}
        for bs in args.batch_sizes:
            n = max(bs, args.min_images)
            n = int(math.ceil(n / bs) * bs)
            images = [pool_images[i % len(pool_images)] for i in range(n)]
            t = time.perf_counter()
            pre = 0.0
            for i in range(0, n, bs):
                t1 = time.perf_counter()
                pixels = enc.preprocess(images[i:i + bs])
                pre += time.perf_counter() - t1
                enc.forward(pixels)
            spent = time.perf_counter() - t
            rows[str(bs)] = {"images": n, "seconds": spent, "images_per_s": n / spent, "preprocess_s": pre}
        out[name] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["pipeline", "render-cost", "render-only", "encoder-cost"])
    ap.add_argument("--files", help="JSON list of {path, rel_path, label}")
    ap.add_argument("--encoder", action="append", default=[], help="NAME=CHECKPOINT_DIR (repeatable)")
    ap.add_argument("--store", help="fresh directory for the qdrant-edge collections")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--views", type=int, default=VIEWS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 1024])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--min-images", type=int, default=8)
    ap.add_argument("--images", help=".npy of uint8 (N, H, W, 3) views to encode (default: noise)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run = {"pipeline": run_pipeline, "render-cost": run_render_cost, "render-only": run_render_only,
           "encoder-cost": run_encoder_cost}[args.command]
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
