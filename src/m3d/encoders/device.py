"""Where and how an encoder runs: device, precision, batch size, and the uint8 image batches it takes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3d.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16")
AUTO_BATCH = {"cuda": 256, "cpu": 32}


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
    """``None``/"auto" -> fp16 on CUDA, fp32 on every CPU (bf16 only on request).

    The CPU default never depends on the CPU: with native bf16 (``cpu_has_fast_bf16``) the same file
    would give vectors 1e-3 away from a CPU without it, so default vectors agree on any x86 machine."""
    if precision in (None, "", "auto"):
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r} (use one of {', '.join(PRECISIONS)})")
    return precision


def runnable_precision(precision: str, device: str) -> str:
    """The stored precision of a collection where this device can compute it, else fp32 (a CUDA GPU
    without bf16): queries encode as the collection was built wherever the hardware allows."""
    if precision == "bf16" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            return "fp32"
    return precision


def dtype(precision: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def choose_batch_size(batch_size: int | None, device: str, auto: int | None = None) -> int:
    if batch_size is None:
        return auto or AUTO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    if int(batch_size) != batch_size or batch_size < 1:
        raise ModelLoadError(f"batch size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def as_images(images: Any) -> torch.Tensor:
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


def to_device(batch: torch.Tensor, device: str) -> torch.Tensor:
    """Host -> device copy; pinned and non-blocking towards CUDA so it overlaps with queued kernels."""
    if batch.device.type == "cpu" and device.startswith("cuda"):
        return batch.contiguous().pin_memory().to(device, non_blocking=True)
    return batch.to(device)

