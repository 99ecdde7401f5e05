"""The encoder protocol: what the pipeline and the searches need from any encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from .registry import Family


class Encoder(Protocol):
    """uint8 NHWC images (rendered views, or a photo) -> float32 ``(N, dim)`` on a device."""

    name: str  # slug used in collection names: "clip", "dinov2", "hog", a hub id's or a checkpoint folder's
    spec: str  # what loads it again on any machine (stored in the fingerprint): alias, hub id, hog spec, model_id
    model_id: str  # identity stored with every point: hub id, "hog:..." or "local:<name>@sha256:<digest>"
    checkpoint: str | None  # the local directory it was loaded from: kept on this machine, never stored
    family: Family  # what it can do: family.can_text says whether encode_text exists
    dim: int
    device: str  # "cuda" / "cpu"
    precision: str  # "fp32" / "fp16" / "bf16"
    batch_size: int  # preferred number of images per encode() call

    def encode(self, images: Any) -> torch.Tensor: ...


class TextEncoder(Encoder, Protocol):
    """An encoder whose family has a text tower: sentences land in the image vectors' space."""

    def encode_text(self, texts: list[str]) -> torch.Tensor: ...  # (N,) strings -> float32 (N, dim)
