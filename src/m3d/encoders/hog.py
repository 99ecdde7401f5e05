"""The weight-free encoder: a Histogram of Oriented Gradients of each view, as batched torch ops.

The whole pipeline runs and can be evaluated with no download at all, and it is the honest baseline
for the neural encoders. ``hog_descriptor`` computes what ``skimage.feature.hog`` computes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from m3d.errors import ModelLoadError

from .device import as_images, to_device
from .preprocess import resize_uint8
from .registry import ALIASES, FAMILIES

if TYPE_CHECKING:
    import torch

HOG_AUTO_BATCH = 256

GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray (ITU-R BT.709)
_HOG_SPEC = re.compile(r"hog:ppc(\d+)-cpb(\d+)-o(\d+)-s(\d+)")


@dataclass(frozen=True)
class HogParams:
    """HOG settings: image resized to ``size`` px square, ``cell`` px cells, ``block`` x ``block`` cell blocks
    (stride one cell, L2-Hys), ``bins`` unsigned orientation bins (0-180 degrees, hard assignment)."""

    cell: int = 8  # 64 px with 8 px cells: the same 1764-d and retrieval quality as 128/16, 3x faster
    block: int = 2
    bins: int = 9
    size: int = 64

    def __post_init__(self) -> None:
        if min(self.cell, self.block, self.bins, self.size) < 1 or self.size // self.cell < self.block:
            raise ModelLoadError(f"invalid HOG parameters {self}")

    @classmethod
    def parse(cls, spec: str) -> HogParams:
        m = _HOG_SPEC.fullmatch(spec)
        if not m:
            raise ModelLoadError(f"bad HOG spec {spec!r}: expected e.g. {ALIASES['hog']}")
        cell, block, bins, size = (int(g) for g in m.groups())
        return cls(cell=cell, block=block, bins=bins, size=size)

    @property
    def spec(self) -> str:
        return f"hog:ppc{self.cell}-cpb{self.block}-o{self.bins}-s{self.size}"

    @property
    def dim(self) -> int:
        blocks = self.size // self.cell - self.block + 1
        return blocks * blocks * self.block * self.block * self.bins


def hog_descriptor(gray: torch.Tensor, params: HogParams = HogParams()) -> torch.Tensor:
    """HOG of grayscale images ``(N, H, W)`` float -> ``(N, dim)``, as ``skimage.feature.hog`` computes it.

    Central-difference gradients (zero on the border rows/columns), unsigned orientation
    ``atan2(g_row, g_col) mod 180`` hard-binned, per-cell mean of gradient magnitude per bin (cells tile
    the image from the top-left; leftover pixels are ignored), overlapping blocks L2-Hys normalised
    (eps 1e-5, clip 0.2), flattened in skimage's (block_row, block_col, cell_row, cell_col, bin) order.
    """
    import torch

    n, h, w = gray.shape
    c, b, o = params.cell, params.block, params.bins
    ncr, ncc = h // c, w // c
    g_row = torch.zeros_like(gray)
    g_col = torch.zeros_like(gray)
    g_row[:, 1:-1, :] = gray[:, 2:, :] - gray[:, :-2, :]
    g_col[:, :, 1:-1] = gray[:, :, 2:] - gray[:, :, :-2]
    g_row, g_col = g_row[:, : ncr * c, : ncc * c], g_col[:, : ncr * c, : ncc * c]
    magnitude = torch.hypot(g_row, g_col)
    # unsigned orientation: bin of (angle mod 180); floor(angle * o/pi) + o is in [0, 2o] (no negatives,
    # so the integer cast floors), and mod o folds (-180, 0) onto [0, 180) and 180 onto bin 0
    bin_idx = (torch.atan2(g_row, g_col) * (o / math.pi) + o).long().remainder_(o)
    # cell index of every pixel, then one scatter-add of magnitudes into (cell, bin) slots
    rows = torch.arange(ncr * c, device=gray.device) // c
    cols = torch.arange(ncc * c, device=gray.device) // c
    cell_idx = (rows[:, None] * ncc + cols[None, :]) * o
    slot = (cell_idx.unsqueeze(0) + bin_idx).reshape(n, -1)
    hist = torch.zeros((n, ncr * ncc * o), dtype=gray.dtype, device=gray.device)
    hist.scatter_add_(1, slot, magnitude.reshape(n, -1))
    hist = hist.view(n, ncr, ncc, o) / float(c * c)
    # overlapping blocks: (n, nbr, nbc, o, b, b) -> (n, nbr, nbc, b, b, o)
    blocks = hist.unfold(1, b, 1).unfold(2, b, 1).permute(0, 1, 2, 4, 5, 3).reshape(n, -1, b * b * o)
    eps2 = 1e-10
    blocks = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps2)
    blocks = blocks.clamp_max(0.2)
    blocks = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps2)
    return blocks.reshape(n, -1)


class HogEncoder:
    """Weight-free HOG descriptor of the views (grayscale, resized to ``size``): no download, any device.

    Always computed in fp32 (the cost is negligible and bin edges are precision-sensitive), so a
    global ``precision`` option does not apply to it.
    """

    family = FAMILIES["hog"]
    checkpoint = None

    def __init__(self, params: HogParams, *, name: str, spec: str, device: str, batch_size: int) -> None:
        self.params = params
        self.name = name
        self.spec = spec
        self.model_id = params.spec
        self.dim = params.dim
        self.device = device
        self.precision = "fp32"
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"HogEncoder({self.model_id!r}, dim={self.dim}, {self.device})"

    def gray(self, images: Any) -> torch.Tensor:
        """uint8 NHWC -> ``(N, size, size)`` grayscale in [0, 1] (the HOG input).

        The colour image is resized first (antialiased bilinear, uint8 like PIL: cheap, and flat
        regions stay exactly flat, so the background has exactly zero gradient instead of float
        noise that L2-Hys would blow up to unit-norm blocks), then converted with skimage's
        ``rgb2gray`` weights.
        """
        import torch

        x = to_device(as_images(images), self.device).permute(0, 3, 1, 2)
        s = self.params.size
        if x.shape[-2:] != (s, s):
            x = resize_uint8(x, (s, s), "bilinear")
        weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32, device=x.device) / 255.0
        r, g, b = x.unbind(1)
        return r.float() * weights[0] + g.float() * weights[1] + b.float() * weights[2]

    def encode(self, images: Any) -> torch.Tensor:
        """uint8 NHWC -> float32 ``(N, dim)`` HOG vectors on ``self.device``."""
        import torch

        x = as_images(images)
        out = torch.empty((x.shape[0], self.dim), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for i in range(0, x.shape[0], self.batch_size):
                chunk = x[i : i + self.batch_size]
                out[i : i + chunk.shape[0]] = hog_descriptor(self.gray(chunk), self.params)
        return out
