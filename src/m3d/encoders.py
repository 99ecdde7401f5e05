"""Image encoders behind one small protocol: uint8 NHWC views -> float32 ``(N, dim)`` on a device.

Three kinds, one front door (``load_encoder``):

- ``clip`` / ``dinov2`` (aliases in ``ALIASES``) and any other Hugging Face hub id or local checkpoint
  directory of those two families (``FAMILIES``, chosen by the checkpoint's ``config.json``
  ``model_type``). Weights load through ``from_pretrained`` from the HF cache; an uncached hub id is
  downloaded only when the hub answers a 2 s probe (``M3D_ALLOW_DOWNLOAD=1``/``0`` forces it), otherwise
  it fails at once with a one-line ``ModelLoadError``.
- ``hog``: a weight-free Histogram of Oriented Gradients descriptor computed as batched torch ops,
  so the whole pipeline runs and can be evaluated with no download at all (and is the honest baseline).

Preprocessing runs as batched tensor ops on the encoder's device, never PIL or an HF processor per
batch: the checkpoint's processor settings are read once at load time and reproduced (resize with the
processor's filter, uint8 rounding between the two separable passes as PIL does, centre crop, rescale,
normalise). That keeps the GPU fed and matches the processor's ``pixel_values`` to ~1 grey level.

Heavy imports (torch, transformers, huggingface_hub) happen inside functions so importing this
module (and the CLI) stays instant.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from m3d.errors import ModelLoadError, one_line

if TYPE_CHECKING:
    import torch

ALLOW_DOWNLOAD_ENV = "M3D_ALLOW_DOWNLOAD"
PRECISIONS = ("fp32", "fp16", "bf16")
AUTO_BATCH = {"cuda": 256, "cpu": 32}
HOG_AUTO_BATCH = 256


class Encoder(Protocol):
    """What the pipeline needs from an encoder; see ``load_encoder``."""

    name: str  # slug used in collection names: "clip", "dinov2", "hog", or a slug of another id
    model_id: str  # hub id / absolute checkpoint path / "hog:..." descriptor id (goes in the fingerprint)
    dim: int
    device: str  # "cuda" / "cpu"
    precision: str  # "fp32" / "fp16" / "bf16"
    batch_size: int  # preferred number of images per encode() call

    def encode(self, images: Any) -> torch.Tensor: ...  # uint8 NHWC (np or torch) -> float32 (N, dim)


# ----------------------------------------------------------------------------------------------
# Registry (data, not if-chains)


@dataclass(frozen=True)
class Family:
    """A checkpoint family: which ``model_type``s it covers, how to load it and read one vector."""

    name: str
    model_types: tuple[str, ...]
    model_class: str  # transformers class that loads every model_type above
    embed: Callable[[Any, torch.Tensor], torch.Tensor]  # (model, pixel_values) -> (N, dim)
    dim: Callable[[Any], int]  # model.config -> output dim


def _clip_embed(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).image_embeds  # projected image embedding (what CLIP search uses)


def _dinov2_embed(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token after the final layernorm


FAMILIES: dict[str, Family] = {
    "clip": Family(
        "clip",
        ("clip", "clip_vision_model"),
        "CLIPVisionModelWithProjection",  # AutoModel on a CLIP checkpoint drops the projection
        _clip_embed,
        lambda cfg: int(cfg.projection_dim),
    ),
    "dinov2": Family("dinov2", ("dinov2",), "Dinov2Model", _dinov2_embed, lambda cfg: int(cfg.hidden_size)),
}

# Named encoders. A name that is a key here wins over a same-named directory (use ./clip for that).
ALIASES: dict[str, str] = {
    "clip": "openai/clip-vit-base-patch32",
    "dinov2": "facebook/dinov2-base",
    "hog": "hog:ppc8-cpb2-o9-s64",
}

# The hub checkpoints' own preprocessor_config.json files (openai/clip-vit-base-patch32 still ships
# the legacy CLIPFeatureExtractor form), written next to random checkpoints so tests and benchmarks
# go through exactly the processor-config parsing that real checkpoints hit.
HUB_PREPROCESSOR: dict[str, dict[str, Any]] = {
    "clip": {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    },
    "dinov2": {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor",
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 256},
    },
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def slug(text: str) -> str:
    """Lowercase ``[a-z0-9_]`` form of an id or directory name, for collection names."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s or "encoder"


def _supported_families() -> str:
    return "; ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in FAMILIES.values())


# ----------------------------------------------------------------------------------------------
# Device, precision, batch size


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 math (AVX512-BF16 / AMX, or Arm BF16); else bf16 is emulated."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_device(device: str | None) -> str:
    """``None``/"auto" -> "cuda" when available, else "cpu"; explicit devices are checked."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here (use --device cpu)")
    return str(dev)


def resolve_precision(precision: str | None, device: str) -> str:
    """``None``/"auto" -> fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."""
    if precision in (None, "", "auto"):
        if device.startswith("cuda"):
            return "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r} (use one of {', '.join(PRECISIONS)})")
    return precision


def _dtype(precision: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _batch_size(batch_size: int | None, device: str, auto: int | None = None) -> int:
    if batch_size is None:
        return auto or AUTO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    if int(batch_size) != batch_size or batch_size < 1:
        raise ModelLoadError(f"batch size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _as_images(images: Any) -> torch.Tensor:
    """uint8 NHWC numpy/torch (or one HWC image) -> a torch uint8 NHWC tensor (no copy when possible)."""
    import torch

    if isinstance(images, torch.Tensor):
        t = images
    else:
        arr = np.ascontiguousarray(images)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # torch warns on read-only memory
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {t.dtype} {tuple(t.shape)}")
    return t


def _to_device(batch: torch.Tensor, device: str) -> torch.Tensor:
    """Host -> device copy; pinned and non-blocking towards CUDA so it overlaps with queued kernels."""
    if batch.device.type == "cpu" and device.startswith("cuda"):
        return batch.contiguous().pin_memory().to(device, non_blocking=True)
    return batch.to(device)


# ----------------------------------------------------------------------------------------------
# Preprocessing: the checkpoint's image processor as tensor ops


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


# ----------------------------------------------------------------------------------------------
# Neural encoders (CLIP / DINOv2 checkpoints)


@dataclass(frozen=True)
class _Source:
    """Where from_pretrained reads: a local dir, or a hub id (from the HF cache unless downloads are on)."""

    location: str
    model_id: str
    name: str
    local_only: bool
    is_dir: bool


def _offline_message(hub_id: str) -> str:
    hint = "" if "/" in hub_id else f" (named encoders: {', '.join(ALIASES)})"  # likely a typo of a name
    return (
        f"weights for {hub_id} are not available offline{hint} (not in the Hugging Face cache, hub not "
        f"reachable): run `huggingface-cli download {hub_id}` on a connected machine, point --encoders at a "
        "local checkpoint directory, or use the weight-free encoder `hog`"
    )


def _dir_slug(path: Path) -> str:
    """A checkpoint directory's name; for an HF cache snapshot (.../models--org--name/snapshots/<sha>)
    the repo's, not the commit hash."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return slug(path.parent.parent.name[len("models--") :].replace("--", "/"))
    return slug(path.name)


def _resolve_source(target: str, name: str | None) -> _Source:
    path = Path(target).expanduser()
    if path.is_dir():
        full = path.resolve()
        return _Source(str(full), str(full), name or _dir_slug(full), True, True)
    looks_like_path = target.startswith(("/", ".", "~")) or target.count("/") > 1 or os.sep != "/" and os.sep in target
    if path.exists():
        raise ModelLoadError(f"{target} is a file, not a checkpoint directory")
    if looks_like_path:
        raise ModelLoadError(f"checkpoint directory {target} not found")
    if not _HUB_ID.fullmatch(target):
        raise ModelLoadError(
            f"{target!r} is neither a checkpoint directory nor a Hugging Face hub id; "
            f"named encoders: {', '.join(ALIASES)}"
        )
    return _Source(target, target, name or slug(target), not _downloads_allowed(), False)


def _downloads_allowed() -> bool:
    """Download from the hub only when it answers: one 2 s probe instead of the hub client's retries
    (23-93 s on a machine without network). M3D_ALLOW_DOWNLOAD=1/0 forces either way; HF_HUB_OFFLINE
    forbids it."""
    import socket
    from urllib.parse import urlsplit

    forced = os.environ.get(ALLOW_DOWNLOAD_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=2).close()
        return True
    except OSError:
        return False


def _read_config(source: _Source) -> dict[str, Any]:
    """config.json as a dict, without importing transformers (so wrong specs fail in milliseconds)."""
    if source.is_dir:
        cfg = Path(source.location) / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"{source.location} has no config.json: not a Hugging Face checkpoint directory")
        file = str(cfg)
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json")
        if isinstance(cached, str):
            file = cached
        elif source.local_only:
            raise ModelLoadError(_offline_message(source.location))
        else:
            from huggingface_hub import hf_hub_download

            try:
                file = hf_hub_download(source.location, "config.json")
            except Exception as e:  # network/auth/404 errors come in many classes; all mean "cannot fetch"
                raise ModelLoadError(f"cannot download {source.location}: {one_line(str(e))}") from e
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {file}: {one_line(str(e))}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} is not a JSON object")
    return data


def _family_for(config: dict[str, Any], model_id: str) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ModelLoadError(
        f"{model_id}: unsupported checkpoint family (model_type {model_type!r}); supported: {_supported_families()}"
    )


def _transformers_quiet() -> Any:
    """Context manager: transformers' load reports and progress bars (unused text-tower weights, a
    "Loading weights" bar per model) are not news for m3d's users."""
    from contextlib import contextmanager

    from transformers.utils import logging as hf_logging

    @contextmanager
    def quiet() -> Any:
        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()

    return quiet()


def _from_pretrained(load: Any, source: _Source, what: str, **kwargs: Any) -> Any:
    """Call a from_pretrained with one-line errors: offline hub ids say how to fix it."""
    try:
        with _transformers_quiet():
            return load(source.location, local_files_only=source.local_only, **kwargs)
    except OSError as e:
        if not source.is_dir and source.local_only:
            raise ModelLoadError(_offline_message(source.location)) from e
        raise ModelLoadError(f"{source.model_id}: cannot load the {what}: {one_line(str(e))}") from e
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelLoadError(f"{source.model_id}: cannot load the {what}: {one_line(str(e))}") from e


def _load_processor(source: _Source) -> Any:
    import transformers
    from transformers import AutoImageProcessor

    # Only the settings are read, so the PIL variant (no torchvision needed) is as good as any.
    kwargs: dict[str, Any] = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    return _from_pretrained(AutoImageProcessor.from_pretrained, source, "image processor config", **kwargs)


def _load_model(family: Family, source: _Source) -> Any:
    import transformers

    return _from_pretrained(getattr(transformers, family.model_class).from_pretrained, source, "weights")


class HFEncoder:
    """A CLIP or DINOv2 checkpoint with tensor preprocessing; see ``load_encoder``."""

    def __init__(
        self,
        *,
        name: str,
        model_id: str,
        family: Family,
        model: Any,
        preprocess: Preprocess,
        device: str,
        precision: str,
        batch_size: int,
    ) -> None:
        self.name = name
        self.model_id = model_id
        self.family = family
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.preprocess = preprocess
        self._dtype = _dtype(precision)
        self.model = model.to(device=device, dtype=self._dtype).eval()
        self.dim = family.dim(model.config)

    def __repr__(self) -> str:
        return f"HFEncoder({self.name!r}, {self.model_id!r}, dim={self.dim}, {self.device}, {self.precision})"

    def pixel_values(self, images: Any) -> torch.Tensor:
        """The model input for ``images`` (float32 NCHW on the device): exposed for parity checks."""
        return self.preprocess(_to_device(_as_images(images), self.device))

    def encode(self, images: Any) -> torch.Tensor:
        """uint8 NHWC -> float32 ``(N, dim)`` on ``self.device``, in chunks of ``batch_size``."""
        import torch

        x = _as_images(images)
        out = torch.empty((x.shape[0], self.dim), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for i in range(0, x.shape[0], self.batch_size):
                pixels = self.preprocess(_to_device(x[i : i + self.batch_size], self.device))
                out[i : i + pixels.shape[0]] = self.family.embed(self.model, pixels.to(self._dtype)).float()
        return out


# ----------------------------------------------------------------------------------------------
# Weight-free encoder: HOG


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

    def __init__(self, params: HogParams, *, name: str, device: str, batch_size: int) -> None:
        self.params = params
        self.name = name
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

        x = _to_device(_as_images(images), self.device).permute(0, 3, 1, 2)
        s = self.params.size
        if x.shape[-2:] != (s, s):
            x = resize_uint8(x, (s, s), "bilinear")
        weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32, device=x.device) / 255.0
        r, g, b = x.unbind(1)
        return r.float() * weights[0] + g.float() * weights[1] + b.float() * weights[2]

    def encode(self, images: Any) -> torch.Tensor:
        """uint8 NHWC -> float32 ``(N, dim)`` HOG vectors on ``self.device``."""
        import torch

        x = _as_images(images)
        out = torch.empty((x.shape[0], self.dim), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for i in range(0, x.shape[0], self.batch_size):
                chunk = x[i : i + self.batch_size]
                out[i : i + chunk.shape[0]] = hog_descriptor(self.gray(chunk), self.params)
        return out


# ----------------------------------------------------------------------------------------------
# Front door


def load_encoder(
    spec: str,
    *,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
) -> Encoder:
    """An encoder by name (``ALIASES``: clip, dinov2, hog), ``hog:...`` spec, hub id or checkpoint dir.

    ``device``/``precision``/``batch_size`` default to auto (cuda+fp16+256 / cpu+bf16-if-native-else-fp32+32).
    Raises ``ModelLoadError`` (one line) for anything the user can fix: uncached hub ids when the hub
    cannot be reached, missing directories, unsupported checkpoint families.
    """
    spec = spec.strip()
    name = spec if spec in ALIASES else None
    target = ALIASES.get(spec, spec)
    if target.startswith("hog:"):
        params = HogParams.parse(target)
        dev = resolve_device(device)
        resolve_precision(precision, dev)  # validate the option even though HOG always runs in fp32
        hog_name = name or ("hog" if params == HogParams() else slug(params.spec))
        return HogEncoder(params, name=hog_name, device=dev, batch_size=_batch_size(batch_size, dev, HOG_AUTO_BATCH))

    source = _resolve_source(target, name)
    family = _family_for(_read_config(source), source.model_id)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    bs = _batch_size(batch_size, dev)
    preprocess = Preprocess.from_processor(_load_processor(source), source.model_id)
    model = _load_model(family, source)
    return HFEncoder(
        name=source.name,
        model_id=source.model_id,
        family=family,
        model=model,
        preprocess=preprocess,
        device=dev,
        precision=prec,
        batch_size=bs,
    )


# ----------------------------------------------------------------------------------------------
# Random checkpoints (tests, benchmarks): same files as a hub checkpoint, random weights


_RANDOM_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    # full CLIPModel like the hub checkpoint (model_type "clip"); the vision tower is what we load
    ("clip", "tiny"): {
        "text_config": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1),
        "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              patch_size=32, image_size=224, projection_dim=24),
        "projection_dim": 24,  # differs from hidden_size so a missing projection cannot go unnoticed
    },
    # openai/clip-vit-base-patch32 (ViT-B/32)
    ("clip", "base"): {
        "text_config": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu"),
        "vision_config": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              patch_size=32, image_size=224, projection_dim=512, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
        "projection_dim": 512,
    },
    ("dinov2", "tiny"): dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             patch_size=14, image_size=224),
    # facebook/dinov2-base (ViT-B/14, position embeddings for 518 px, interpolated at 224)
    ("dinov2", "base"): dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                             patch_size=14, image_size=518, hidden_act="gelu", layer_norm_eps=1e-6,
                             layerscale_value=1.0, qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0),
}


def save_random_checkpoint(family: str, directory: str | Path, size: str = "tiny", *, seed: int = 0) -> Path:
    """Write a randomly initialised ``clip``/``dinov2`` checkpoint (+ the hub's preprocessor config) to
    ``directory`` and return its absolute path. ``size``: "tiny" (~100s of KB) or "base" (real ViT-B).

    Pretrained weights cannot be downloaded everywhere; these let tests and benchmarks exercise the
    exact ``load_encoder(path)`` code path that hub checkpoints take.
    """
    import torch
    import transformers

    if (family, size) not in _RANDOM_CONFIGS:
        raise ValueError(f"no random checkpoint for family={family!r} size={size!r}; "
                         f"choose from {sorted(_RANDOM_CONFIGS)}")
    cfg = _RANDOM_CONFIGS[(family, size)]
    if family == "clip":
        with _transformers_quiet():
            config = transformers.CLIPConfig(**cfg)
        model_cls = transformers.CLIPModel
    else:
        config = transformers.Dinov2Config(**cfg)
        model_cls = transformers.Dinov2Model
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), _transformers_quiet():
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR[family], indent=2) + "\n")
    return path
