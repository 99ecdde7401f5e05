"""The one place that says which encoder families exist and what each can do.

Every family encodes images (rendered views, and photos for ``query --image``); a family with a
``text`` tower also encodes sentences into the same space (``query --text``). Hugging Face checkpoint
families are recognised by their ``config.json`` ``model_type``; the weight-free ``hog`` family needs
no checkpoint, nor does ``gradhist`` (its whitening ships with the package). A new checkpoint family (SigLIP, OpenCLIP exported to transformers) is one entry in
``FAMILIES``: its model types, the transformers classes of its towers, and how to read one vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TextTower:
    """A text encoder whose outputs share the image embeds' space (same projection dim)."""

    model_class: str  # transformers class that loads the text tower from the same checkpoint
    embed: Callable[[Any, dict[str, Any]], torch.Tensor]  # (model, tokenizer output) -> (N, dim)


@dataclass(frozen=True)
class Family:
    """An encoder family: which checkpoints it covers, how to load and read them, and what it can do."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type values; () for the weight-free family
    model_class: str | None  # transformers class of the image tower (None: no checkpoint)
    embed: Callable[[Any, torch.Tensor], torch.Tensor] | None  # (model, pixel_values) -> (N, dim)
    dim: Callable[[Any], int] | None  # model.config -> output dim
    text: TextTower | None = None
    # config.json (a dict) -> output dim, read without transformers (importing it imports torch): a sync
    # with nothing to encode plans from it; the loaded model is checked against it
    config_dim: Callable[[dict], int] | None = None

    @property
    def can_text(self) -> bool:
        return self.text is not None


def _clip_embed(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).image_embeds  # projected image embedding (what CLIP search uses)


def _clip_text_embed(model: Any, tokens: dict[str, Any]) -> torch.Tensor:
    return model(**tokens).text_embeds  # projected text embedding: the image embeds' space


def _dinov2_embed(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token after the final layernorm


def _clip_dim(cfg: Any) -> int:
    return int(cfg.projection_dim)


#: transformers' CLIPVisionConfig / Dinov2Config defaults, for config.json files that leave a field out
_DEFAULT_PROJECTION, _DEFAULT_HIDDEN = 512, 768


def _clip_config_dim(config: dict) -> int:
    """The vision tower's projection: a full CLIP checkpoint's image tower reads its vision_config."""
    return int(config.get("vision_config", {}).get("projection_dim", _DEFAULT_PROJECTION))


FAMILIES: dict[str, Family] = {
    # AutoModel on a CLIP checkpoint drops the projection: the *WithProjection classes keep it
    "clip": Family("clip", ("clip",), "CLIPVisionModelWithProjection", _clip_embed, _clip_dim,
                   text=TextTower("CLIPTextModelWithProjection", _clip_text_embed), config_dim=_clip_config_dim),
    "clip_vision": Family("clip_vision", ("clip_vision_model",), "CLIPVisionModelWithProjection", _clip_embed,
                          _clip_dim, config_dim=lambda c: int(c.get("projection_dim", _DEFAULT_PROJECTION))),
    "dinov2": Family("dinov2", ("dinov2",), "Dinov2Model", _dinov2_embed, lambda cfg: int(cfg.hidden_size),
                     config_dim=lambda c: int(c.get("hidden_size", _DEFAULT_HIDDEN))),
    "hog": Family("hog", (), None, None, None),
    "gradhist": Family("gradhist", (), None, None, None),
}

# Named encoders. A name that is a key here wins over a same-named directory (use ./clip for that).
ALIASES: dict[str, str] = {
    "clip": "openai/clip-vit-base-patch32",
    "dinov2": "facebook/dinov2-base",
    "hog": "hog:ppc8-cpb2-o9-s64",
    "gradhist": "gradhist:s128-g16.8-sil8-o8-w128p25",
}


def family_for_model_type(model_type: Any, model_id: str) -> Family:
    """The checkpoint family of a config.json ``model_type``; one line naming the supported ones if none."""
    from m3d.errors import ModelLoadError

    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = "; ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in FAMILIES.values()
                          if f.model_types)
    raise ModelLoadError(f"{model_id}: unsupported checkpoint family (model_type {model_type!r}); supported: {supported}")
