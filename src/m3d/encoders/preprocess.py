"""A checkpoint's image processor reproduced as batched tensor ops on the encoder's device.

The processor's settings are read once at load time (``Preprocess.from_processor``) and applied to
every batch: resize with the processor's filter (uint8 rounding between the two separable passes as
PIL does), centre crop, rescale, normalise. That keeps a GPU fed (no PIL or HF processor per batch)
and matches the processor's ``pixel_values`` to ~1 grey level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from m3d.errors import ModelLoadError

if TYPE_CHECKING:
    import torch


_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}  # PIL filter id -> torch mode


def _size_get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, int):  # very old processors keep a bare int
        return size if key == "shortest_edge" else None
    value = size.get(key) if isinstance(size, Mapping) or hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class Preprocess:
    """The settings of a checkpoint's image processor, applied as batched tensor ops.

    Mirrors ``BaseImageProcessor``'s resize (shortest edge or fixed size; PIL resizes uint8 in two
    separable passes, horizontal first, rounding to uint8 after each; torch's antialiased bicubic
    uses PIL's a=-0.5 kernel), centre crop (zero pad when too small), rescale and normalise.
    """

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    mode: str
    crop_hw: tuple[int, int] | None
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, proc: Any, where: str) -> Preprocess:
        """Read the settings once from an instantiated HF image processor."""
        shortest = resize_hw = None
        if getattr(proc, "do_resize", False):
            size = proc.size
            h, w, se = _size_get(size, "height"), _size_get(size, "width"), _size_get(size, "shortest_edge")
            if se is not None and _size_get(size, "longest_edge") is None:
                shortest = se
            elif h is not None and w is not None:
                resize_hw = (h, w)
            else:
                raise ModelLoadError(f"{where}: unsupported image processor size {dict(size)!r}")
        resample = getattr(proc, "resample", None)
        resample = 3 if resample is None else int(resample)  # PIL filter id (an IntEnum in transformers)
        if resample not in _RESAMPLE_MODES:
            supported = "bicubic, bilinear, nearest"
            raise ModelLoadError(f"{where}: unsupported resample filter {resample} (supported: {supported})")
        crop_hw = None
        if getattr(proc, "do_center_crop", False):
            ch, cw = _size_get(proc.crop_size, "height"), _size_get(proc.crop_size, "width")
            if ch is None or cw is None:
                raise ModelLoadError(f"{where}: unsupported crop size {proc.crop_size!r}")
            crop_hw = (ch, cw)
        rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else None
        mean = std = None
        if getattr(proc, "do_normalize", False):
            mean = tuple(float(v) for v in np.broadcast_to(np.asarray(proc.image_mean, dtype=np.float64), (3,)))
            std = tuple(float(v) for v in np.broadcast_to(np.asarray(proc.image_std, dtype=np.float64), (3,)))
        return cls(shortest, resize_hw, _RESAMPLE_MODES[resample], crop_hw, rescale, mean, std)

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Target size of the resize step for an input of ``h`` x ``w`` (as HF computes it)."""
        if self.shortest_edge is not None:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_long, new_short) if w <= h else (new_short, new_long)
        if self.resize_hw is not None:
            return self.resize_hw
        return h, w

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on the target device -> float32 NCHW ``pixel_values``."""
        x = images.permute(0, 3, 1, 2)  # a channels-last view, what the uint8 resize kernel wants
        h, w = x.shape[-2:]
        size = self.output_hw(h, w)
        if size != (h, w):
            x = resize_uint8(x, size, self.mode)
        if self.crop_hw is not None:
            x = _center_crop(x, *self.crop_hw)
        # one uint8 NCHW copy, then float and an in-place affine map: 7x cheaper on CPU than
        # (x * scale - mean) / std on the channels-last view
        x = x.contiguous().float()
        scale = self.rescale if self.rescale is not None else 1.0
        if self.mean is not None and self.std is not None:
            gain, bias = _affine_tensors(scale, self.mean, self.std, str(x.device))
            return x.mul_(gain).add_(bias)
        return x.mul_(scale) if scale != 1.0 else x


def resize_uint8(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize uint8 NCHW images as PIL does (antialiased, uint8 result), on any device.

    PIL resamples uint8 in two separable passes, horizontal then vertical, rounding to uint8 after
    each; torch's antialiased kernels use PIL's filters (bicubic a=-0.5). On CPU torch has a uint8
    port of PIL's resampler (identical output, ~4x faster than float); other devices run the same
    two passes in float with rounding (``_resize_float``: within 1 grey level of PIL on ~0.01% of pixels).
    """
    import torch.nn.functional as F

    if mode == "nearest-exact":
        return F.interpolate(x, size=size, mode=mode)
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return _resize_float(x, size, mode)


def _resize_float(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    nh, nw = size
    y = x.float()
    if nw != w:
        y = F.interpolate(y, size=(h, nw), mode=mode, antialias=True, align_corners=False).round_().clamp_(0, 255)
    if nh != h:
        y = F.interpolate(y, size=(nh, nw), mode=mode, antialias=True, align_corners=False).round_().clamp_(0, 255)
    return y.to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _affine_tensors(
    scale: float, mean: tuple[float, ...], std: tuple[float, ...], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * scale - mean) / std == x * gain + bias, as (1, 3, 1, 1) tensors on ``device``."""
    import torch

    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    gain, bias = scale / s, -m / s
    return (gain.float().view(1, 3, 1, 1).to(device), bias.float().view(1, 3, 1, 1).to(device))


def _center_crop(x: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    """HF's centre crop: offset (size - crop) // 2; zero padding (centred, ceil) when the image is smaller."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if ch > h or cw > w:
        nh, nw = max(ch, h), max(cw, w)
        top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        x = F.pad(x, (left, nw - w - left, top, nh - h - top))
        h, w = nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]
