"""Hugging Face checkpoint encoders (the families in ``registry.FAMILIES``): the image tower on
tensor-preprocessed views, and, for families that have one, the text tower in the same space."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from m3d.errors import ModelLoadError, one_line

from .device import as_images, dtype, to_device
from .hub import TOKENIZER_FILES, Source, from_pretrained, has_file
from .preprocess import Preprocess
from .registry import Family

if TYPE_CHECKING:
    import torch


def load_processor(source: Source) -> Any:
    import transformers
    from transformers import AutoImageProcessor

    # Only the settings are read, so the PIL variant (no torchvision needed) is as good as any.
    kwargs: dict[str, Any] = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    return from_pretrained(AutoImageProcessor.from_pretrained, source, "image processor config", **kwargs)


def load_model(model_class: str, source: Source, what: str = "weights") -> Any:
    import transformers

    return from_pretrained(getattr(transformers, model_class).from_pretrained, source, what)


class HFEncoder:
    """A checkpoint of one registry family with tensor preprocessing; see ``load_encoder``."""

    def __init__(
        self,
        *,
        source: Source,
        spec: str,
        family: Family,
        model: Any,
        preprocess: Preprocess,
        device: str,
        precision: str,
        batch_size: int,
    ) -> None:
        self.source = source
        self.name = source.name
        self.spec = spec
        self.model_id = source.model_id
        self.checkpoint = source.location if source.is_dir else None
        self.family = family
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.preprocess = preprocess
        self._dtype = dtype(precision)
        self.model = model.to(device=device, dtype=self._dtype).eval()
        self.dim = family.dim(model.config)
        self._text: tuple[Any, Any] | None = None  # (tokenizer, text model), loaded on first use

    def __repr__(self) -> str:
        return f"HFEncoder({self.name!r}, {self.model_id!r}, dim={self.dim}, {self.device}, {self.precision})"

    def pixel_values(self, images: Any) -> torch.Tensor:
        """The model input for ``images`` (float32 NCHW on the device): exposed for parity checks."""
        return self.preprocess(to_device(as_images(images), self.device))

    def encode(self, images: Any) -> torch.Tensor:
        """uint8 NHWC -> float32 ``(N, dim)`` on ``self.device``, in chunks of ``batch_size``."""
        import torch

        x = as_images(images)
        out = torch.empty((x.shape[0], self.dim), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for i in range(0, x.shape[0], self.batch_size):
                pixels = self.preprocess(to_device(x[i : i + self.batch_size], self.device))
                out[i : i + pixels.shape[0]] = self.family.embed(self.model, pixels.to(self._dtype)).float()
        return out

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Sentences -> float32 ``(N, dim)`` through the family's text tower (same space as ``encode``).

        The tokenizer and text tower load on first use, so syncing never pays for them."""
        import torch

        if self.family.text is None:
            raise ModelLoadError(f"{self.model_id}: a {self.family.name} checkpoint has no text tower")
        tokenizer, model = self._text_tower()
        limit = int(getattr(model.config, "max_position_embeddings", 77))
        tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            return self.family.text.embed(model, tokens).float()

    def _text_tower(self) -> tuple[Any, Any]:
        if self._text is None:
            from transformers import AutoTokenizer

            missing = f"{self.model_id}: no tokenizer beside the weights (text queries need one"
            if not has_file(self.source, TOKENIZER_FILES):
                raise ModelLoadError(f"{missing}: {', '.join(TOKENIZER_FILES)})")
            try:
                tokenizer = from_pretrained(AutoTokenizer.from_pretrained, self.source, "tokenizer")
            except ModelLoadError as e:
                raise ModelLoadError(f"{missing}): {one_line(str(e), 160)}") from e
            model = load_model(self.family.text.model_class, self.source, "text tower")
            self._text = (tokenizer, model.to(device=self.device, dtype=self._dtype).eval())
        return self._text
