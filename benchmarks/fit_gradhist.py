"""Fit gradhist's whitening (not a test): the PCA that ships as src/m3d/encoders/gradhist_psb.npz.

    python benchmarks/render_cache.py ../shared/datasets/psb-train /tmp/psb-ring8-y.npz --up y
    python benchmarks/fit_gradhist.py /tmp/psb-ring8-y.npz

Every view of the cache (psb-train: 904 meshes x 8 ring views, +y up) is described by gradhist's raw
histograms (``GradHistEncoder.raw``, the same code a sync runs); their mean and the leading
eigenvectors and eigenvalues of their covariance are written. No class label is read. Each
component's sign is fixed (largest entry positive) so a refit on the same views gives the same file up
to float rounding; the digest of the file becomes part of every gradhist point's model_id, so a store
made with another fit re-embeds instead of mixing vectors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main() -> None:
    import torch

    from m3d.encoders.gradhist import FIT_FILE, GradHistParams
    from m3d.encoders import load_encoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", type=Path, help="a benchmarks/render_cache.py .npz")
    ap.add_argument("--components", type=int, default=GradHistParams().dim)
    ap.add_argument("--out", type=Path, default=FIT_FILE)
    args = ap.parse_args()
    params = GradHistParams(dim=0)
    encoder = load_encoder(params.spec, device="cpu")
    views = np.load(args.cache)["views"]
    grey = views.reshape(-1, *views.shape[2:])
    start = time.perf_counter()
    raw = torch.cat([encoder.raw(np.repeat(grey[i:i + 256, ..., None], 3, axis=-1))
                     for i in range(0, len(grey), 256)]).double().numpy()
    mean = raw.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(np.cov(raw - mean, rowvar=False))
    keep = np.argsort(eigenvalues)[::-1][: args.components]
    components = vectors[:, keep].T
    components *= np.sign(components[np.arange(len(keep)), np.abs(components).argmax(axis=1)])[:, None]
    np.savez_compressed(args.out, mean=mean.astype(np.float32), components=components.astype(np.float16),
                        eigenvalues=eigenvalues[keep].astype(np.float32), features=np.array(params.features))
    print(f"{len(raw)} views x {raw.shape[1]} -> {len(keep)} components in {time.perf_counter() - start:.0f} s; "
          f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
