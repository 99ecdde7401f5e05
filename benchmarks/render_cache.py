"""Render a labelled tree once into a cache (not a test): the fast loop for tuning view descriptors.

    python benchmarks/render_cache.py ../shared/datasets/psb-train /tmp/psb-ring8-y.npz --up y
    python benchmarks/render_cache.py ../shared/datasets/psb-train /tmp/psb-sphere20.npz --layout sphere --views 20

Every mesh goes through the pipeline's own load, pose and renderer (the views a sync would encode), and
the grey channel is kept (the renders are grey: R = G = B). The .npz holds ``views`` (objects, views,
size, size) uint8, ``labels`` and ``paths``; benchmarks/descriptor.py scores descriptors on it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main() -> None:
    from m3d.dataset import discover
    from m3d.meshio import load_mesh
    from m3d.orientation import pose
    from m3d.render import ViewSettings, create_renderer, posed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--up", default="y")
    ap.add_argument("--layout", default="ring")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    view = ViewSettings(views=args.views, size=args.size, up=args.up, layout=args.layout)
    files, _ = discover(args.data)
    renderer = create_renderer(view)
    views = np.empty((len(files), view.views, view.size, view.size), dtype=np.uint8)
    start = time.perf_counter()
    try:
        for i, f in enumerate(files):
            mesh = load_mesh(f.path)
            views[i] = renderer.render(posed(mesh, pose(mesh, view, suffix=f.path.suffix).rotation))[..., 0]
    finally:
        renderer.close()
    print(f"{len(files)} objects x {view.views} views in {time.perf_counter() - start:.1f} s")
    np.savez(args.out, views=views, labels=np.array([f.label for f in files]),
             paths=np.array([f.rel_path for f in files]))


if __name__ == "__main__":
    main()
