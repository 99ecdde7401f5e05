"""How much gradhist's whitening is worth on shapes it was not fitted on (not a test).

    python benchmarks/render_cache.py ../shared/datasets/psb-train /tmp/psb-ring8-y.npz --up y
    python benchmarks/gradhist_cv.py /tmp/psb-ring8-y.npz --dims 0,128,256 --powers 0.25,0.5

Class-disjoint two-fold: the classes are split in two halves (alternate classes in sorted order); the
PCA is fitted on one half's views and every object of the other half queries the other objects of
its half (mean pool, self excluded), then the halves swap and the two scores are averaged. dim 0 is
the raw histograms, no fit. A fit on all of psb-train scored on psb-train itself (what the shipped
file would show there) flatters it; this is the figure to trust for new shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def scores(objects: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from m3d.evaluate import ranking_metrics

    m = ranking_metrics(unit(objects).astype(np.float32), labels)
    return {"nn": np.nanmean(m["nn"]), "ft": np.nanmean(m["ft"]), "st": np.nanmean(m["st"]),
            "dcg": np.nanmean(m["dcg"]), "p@5": np.nanmean(m["precision"][5]), "map": np.nanmean(m["ap"])}


def main() -> None:
    import torch

    from m3d.encoders import GradHistParams, load_encoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--dims", default="0,128,256")
    ap.add_argument("--powers", default="0.25,0.5")
    args = ap.parse_args()
    data = np.load(args.cache)
    views, labels = data["views"], data["labels"]
    encoder = load_encoder(GradHistParams(dim=0).spec, device="cpu")
    grey = views.reshape(-1, *views.shape[2:])
    raw = torch.cat([encoder.raw(np.repeat(grey[i:i + 256, ..., None], 3, axis=-1))
                     for i in range(0, len(grey), 256)]).double().numpy().reshape(*views.shape[:2], -1)
    classes = np.array(sorted(set(labels)))
    halves = np.isin(labels, classes[0::2])
    for dim in (int(d) for d in args.dims.split(",")):
        for power in ([0.0] if dim == 0 else [float(p) for p in args.powers.split(",")]):
            folds = []
            for fit, test in ((halves, ~halves), (~halves, halves)):
                x = raw[test]
                if dim:
                    flat = raw[fit].reshape(-1, raw.shape[-1])
                    mean = flat.mean(axis=0)
                    values, vectors = np.linalg.eigh(np.cov(flat - mean, rowvar=False))
                    keep = np.argsort(values)[::-1][:dim]
                    x = unit((x - mean) @ (vectors[:, keep] * values[keep] ** -power))
                folds.append(scores(x.mean(axis=1), labels[test]))
            row = {k: (folds[0][k] + folds[1][k]) / 2 for k in folds[0]}
            print(f"dim {dim:4d} power {power:.2f}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
