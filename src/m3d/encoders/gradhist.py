"""The weight-free shape descriptor: multi-scale gradient histograms of the shading and the silhouette,
whitened by a PCA fitted on unlabelled renders, as batched torch ops.

Per view: the grey render resized to ``size``; signed gradient orientations soft-binned into ``bins``
(the headlight is fixed to the camera, so a gradient's sign says which side is lit, and on the
silhouette which side is object); magnitudes averaged over overlapping cells (each cell's window is
twice its stride, so a shape that moves by part of a cell changes the histograms smoothly) on a fine
and a coarse grid of the shading and a coarse grid of the silhouette; square-rooted (the Hellinger
kernel: a few strong edges no longer dominate a histogram) and each part L2-normalised. The
concatenation is then projected on the leading principal components of psb-train's views and scaled
by eigenvalue ** -``power`` (partial whitening: rare directions of variation weigh as much as the
common ones, so views are compared by what distinguishes shapes rather than by what every render
shares). The fit uses no class label; ``benchmarks/fit_gradhist.py`` reproduces it and the result
ships as ``gradhist_psb.npz`` beside this module.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3d.errors import ModelLoadError

from .device import as_images, to_device
from .hog import GRAY_WEIGHTS
from .registry import ALIASES, FAMILIES

if TYPE_CHECKING:
    import numpy as np
    import torch

GRADHIST_AUTO_BATCH = 128
FIT_FILE = Path(__file__).with_name("gradhist_psb.npz")
_SPEC = re.compile(r"gradhist:s(\d+)-g(\d+)\.(\d+)-sil(\d+)-o(\d+)-w(\d+)p(\d+)(?:@([0-9a-f]{12}))?")


@dataclass(frozen=True)
class GradHistParams:
    """``size`` px square input; shading histograms on a ``fine`` and a ``coarse`` grid of cells, the
    silhouette's on a ``sil`` grid, ``bins`` signed orientations; ``dim`` whitened components (0: the
    raw histograms, no fit) scaled by eigenvalue ** -``power`` (in hundredths in the spec)."""

    size: int = 128
    fine: int = 16
    coarse: int = 8
    sil: int = 8
    bins: int = 8
    dim: int = 128
    power: float = 0.25

    def __post_init__(self) -> None:
        grids = (self.fine, self.coarse, self.sil)
        if (min(*grids, self.bins, self.size) < 1 or self.bins < 2 or any(self.size % (2 * g) for g in grids)
                or self.fine % self.coarse):
            raise ModelLoadError(f"invalid gradhist parameters {self}: twice every grid must divide the size, "
                                 "and the coarse grid the fine one")
        if self.dim < 0 or not 0.0 <= self.power <= 1.0:
            raise ModelLoadError(f"invalid gradhist whitening {self}: dim >= 0, power in [0, 1]")

    @classmethod
    def parse(cls, spec: str) -> tuple[GradHistParams, str | None]:
        """Parameters and, when the spec names one (a stored model_id), the fit's digest."""
        m = _SPEC.fullmatch(spec)
        if not m:
            raise ModelLoadError(f"bad gradhist spec {spec!r}: expected e.g. {ALIASES['gradhist']}")
        size, fine, coarse, sil, bins, dim, power = (int(g) for g in m.groups()[:7])
        return cls(size=size, fine=fine, coarse=coarse, sil=sil, bins=bins, dim=dim, power=power / 100), m.group(8)

    @property
    def features(self) -> str:
        """The raw histograms' part of the spec: a fit is valid only for the features it was fitted on."""
        return f"s{self.size}-g{self.fine}.{self.coarse}-sil{self.sil}-o{self.bins}"

    @property
    def spec(self) -> str:
        return f"gradhist:{self.features}-w{self.dim}p{round(self.power * 100)}"

    @property
    def raw_dim(self) -> int:
        return self.bins * (self.fine ** 2 + self.coarse ** 2 + self.sil ** 2)


def _orientation_maps(x: torch.Tensor, bins: int) -> torch.Tensor:
    """(N, 1, H, W) -> (N, bins, H, W): central-difference gradient magnitude, linearly shared between
    the two nearest of ``bins`` signed orientation bins. Each call below writes every target slot at
    most once (a pixel's two bins differ), so the result is deterministic on every device."""
    import torch

    gx = torch.zeros_like(x)
    gy = torch.zeros_like(x)
    gx[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
    gy[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
    magnitude = torch.hypot(gx, gy)
    position = torch.remainder(torch.atan2(gy, gx), 2 * math.pi) * (bins / (2 * math.pi))  # [0, bins]
    low = position.floor()
    upper_share = position - low
    low = low.long().remainder_(bins)  # 2 pi itself (float rounding) folds onto bin 0
    maps = torch.zeros((x.shape[0], bins, *x.shape[-2:]), dtype=x.dtype, device=x.device)
    maps.scatter_(1, low, magnitude * (1.0 - upper_share))
    return maps.scatter_add_(1, (low + 1).remainder_(bins), magnitude * upper_share)


def _cells(maps: torch.Tensor, grids: tuple[int, ...]) -> list[torch.Tensor]:
    """Mean of each map over a ``grid`` x ``grid`` layout of windows twice the stride (zero beyond the
    border), square-rooted and L2-normalised per grid: (N, bins, H, W) -> [(N, bins * grid * grid)].
    Computed as means over half-stride blocks (one pass over the pixels), then over 4 x 4 of those."""
    import torch.nn.functional as F

    size = maps.shape[-1]
    finest = max(grids)
    half = F.avg_pool2d(maps, size // (2 * finest))  # (N, bins, 2 * finest, 2 * finest)
    out = []
    for grid in grids:
        blocks = half if grid == finest else F.avg_pool2d(half, finest // grid)
        pooled = F.avg_pool2d(blocks, 4, stride=2, padding=1, count_include_pad=True)
        out.append(F.normalize(pooled.sqrt().flatten(1), dim=1))
    return out


def raw_histograms(gray: torch.Tensor, silhouette: torch.Tensor, params: GradHistParams) -> torch.Tensor:
    """(N, 1, size, size) shading in [0, 1] and silhouette in {0..1} -> (N, raw_dim), unit rows."""
    import torch
    import torch.nn.functional as F

    fine, coarse = _cells(_orientation_maps(gray, params.bins), (params.fine, params.coarse))
    (outline,) = _cells(_orientation_maps(silhouette, params.bins), (params.sil,))
    return F.normalize(torch.cat([fine, coarse, outline], dim=1), dim=1)


@dataclass(frozen=True)
class Whitening:
    """A fitted projection: ``(x - mean) @ components.T``, scaled per component."""

    mean: np.ndarray  # (raw_dim,)
    components: np.ndarray  # (k, raw_dim), leading first
    eigenvalues: np.ndarray  # (k,)
    features: str  # GradHistParams.features it was fitted on
    digest: str  # sha256 of the file, 12 hex digits: part of every point's model_id


@lru_cache(maxsize=2)
def load_whitening(path: Path = FIT_FILE) -> Whitening:
    import numpy as np

    try:
        data = path.read_bytes()
        with np.load(path) as fit:
            return Whitening(fit["mean"].astype(np.float32), fit["components"].astype(np.float32),
                             fit["eigenvalues"].astype(np.float32), str(fit["features"]),
                             hashlib.sha256(data).hexdigest()[:12])
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"gradhist's fitted whitening {path} is missing or unreadable ({exc}): "
                             "reinstall m3d or rebuild it with benchmarks/fit_gradhist.py") from None


class GradHistEncoder:
    """Weight-free shape descriptor of the views (see the module doc): no download, any device, fp32."""

    family = FAMILIES["gradhist"]
    checkpoint = None

    def __init__(self, params: GradHistParams, *, name: str, spec: str, device: str, batch_size: int,
                 digest: str | None = None) -> None:
        import torch

        self.params = params
        self.name = name
        self.spec = spec
        self.device = device
        self.precision = "fp32"
        self.batch_size = batch_size
        self._projection = None
        self.model_id = params.spec
        self.dim = params.raw_dim
        if params.dim:
            fit = load_whitening()
            if fit.features != params.features:
                raise ModelLoadError(f"{params.spec}: the shipped whitening was fitted on other features "
                                     f"({fit.features}); use w0 (no whitening) with these")
            if params.dim > len(fit.eigenvalues):
                raise ModelLoadError(f"{params.spec}: the shipped whitening has {len(fit.eigenvalues)} components")
            if digest is not None and digest != fit.digest:
                raise ModelLoadError(f"{params.spec}@{digest} was made with another fit of the whitening than "
                                     f"this m3d ships ({fit.digest}): re-sync the collection")
            scale = fit.eigenvalues[: params.dim] ** -params.power
            self._mean = torch.from_numpy(fit.mean).to(device)
            self._projection = torch.from_numpy((fit.components[: params.dim].T * scale).astype("float32")).to(device)
            self.model_id = f"{params.spec}@{fit.digest}"
            self.dim = params.dim

    def __repr__(self) -> str:
        return f"GradHistEncoder({self.model_id!r}, dim={self.dim}, {self.device})"

    def raw(self, images: Any) -> torch.Tensor:
        """uint8 NHWC -> ``(N, raw_dim)`` histograms before whitening (what the fit is computed on)."""
        import torch
        import torch.nn.functional as F

        x = to_device(as_images(images), self.device)
        weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32, device=x.device) / 255.0
        grey = x.float() @ weights  # a render is grey already (R = G = B); a photo becomes one
        silhouette = (x != 255).any(dim=-1).float()  # the renderer keeps every object pixel below white
        # both planes in one resize; area: every source pixel counts once, whatever the ratio
        both = F.interpolate(torch.stack([grey, silhouette], dim=1), size=(self.params.size,) * 2, mode="area")
        return raw_histograms(both[:, :1], both[:, 1:], self.params)

    def encode(self, images: Any) -> torch.Tensor:
        """uint8 NHWC -> float32 ``(N, dim)`` unit vectors on ``self.device``."""
        import torch
        import torch.nn.functional as F

        x = as_images(images)
        out = torch.empty((x.shape[0], self.dim), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for i in range(0, x.shape[0], self.batch_size):
                raw = self.raw(x[i : i + self.batch_size])
                if self._projection is not None:
                    raw = F.normalize((raw - self._mean) @ self._projection, dim=1)
                out[i : i + raw.shape[0]] = raw
        return out

