"""Image encoders behind one small protocol (``base.Encoder``), with one front door: ``load_encoder``.

- ``registry``: the families (clip, clip_vision, dinov2, hog), the named aliases, what each can do.
- ``hub``: where a checkpoint comes from (hub id, local directory, HF cache) and the identity that is
  stored, which is never a local path.
- ``device``: device, precision and batch-size choice; ``preprocess``: the checkpoint's image processor
  as tensor ops; ``hf``: checkpoint encoders (image and text towers); ``hog`` and ``gradhist``: the
  weight-free encoders (gradhist: the better descriptor; hog: kept as it was, for the stores it made).

Heavy imports (torch, transformers, huggingface_hub) happen inside functions, so importing this
package (and the CLI) stays instant.
"""

from __future__ import annotations

from pathlib import Path

from m3d.errors import ModelLoadError

from .base import Encoder, TextEncoder
from .device import (PRECISIONS, choose_batch_size, cpu_has_fast_bf16, resolve_device, resolve_precision,
                     runnable_precision)
from .gradhist import GRADHIST_AUTO_BATCH, GradHistEncoder, GradHistParams
from .hog import HOG_AUTO_BATCH, HogEncoder, HogParams, hog_descriptor
from .hub import identified, is_local_id, local_name, read_config, resolve_source, slug
from .preprocess import Preprocess, resize_uint8
from .registry import ALIASES, FAMILIES, Family, family_for_model_type

__all__ = [
    "ALIASES", "FAMILIES", "PRECISIONS", "Encoder", "Family", "GradHistParams", "HogParams", "ModelLoadError", "Preprocess",
    "TextEncoder", "cpu_has_fast_bf16", "family_of", "hog_descriptor", "is_local_id", "load_encoder",
    "resize_uint8", "resolve_device", "resolve_precision", "runnable_precision", "slug",
]


def family_of(spec: str, *, checkpoint: str | Path | None = None) -> Family:
    """The family of an encoder spec without loading weights (config.json only): what it can do."""
    spec = spec.strip()
    target = ALIASES.get(spec, spec)
    for weight_free in ("hog", "gradhist"):
        if target.startswith(f"{weight_free}:"):
            return FAMILIES[weight_free]
    if is_local_id(target):
        if checkpoint is None:
            raise ModelLoadError(_no_checkpoint_message(target))
        target = str(checkpoint)
    source = resolve_source(target, None)
    return family_for_model_type(read_config(source).get("model_type"), source.model_id)


def _no_checkpoint_message(model_id: str) -> str:
    return (f"{model_id} is a local checkpoint and this store does not know where it is on this machine "
            "(synced elsewhere, or its folder moved): pass --checkpoint DIR")


def load_encoder(
    spec: str,
    *,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    checkpoint: str | Path | None = None,
) -> Encoder:
    """An encoder by name (``ALIASES``: clip, dinov2, hog, gradhist), ``hog:...`` or ``gradhist:...`` spec,
    hub id or checkpoint dir.

    A stored local identity (``local:<name>@sha256:<digest>``, a fingerprint's ``encoder``) loads from
    ``checkpoint``, the directory holding those weights; other weights there are refused.
    ``device``/``precision``/``batch_size`` default to auto (cuda+fp16+256 / cpu+fp32+32).
    Raises ``ModelLoadError`` (one line) for anything the user can fix: uncached hub ids when the hub
    cannot be reached, missing directories, unsupported checkpoint families, a checkpoint that changed.
    """
    from .hf import HFEncoder, load_model, load_processor

    spec = spec.strip()
    name = spec if spec in ALIASES else None
    target = ALIASES.get(spec, spec)
    if target.startswith("hog:"):
        params = HogParams.parse(target)
        dev = resolve_device(device)
        resolve_precision(precision, dev)  # validate the option even though HOG always runs in fp32
        hog_name = name or ("hog" if params == HogParams() else slug(params.spec))
        return HogEncoder(params, name=hog_name, spec=spec, device=dev,
                          batch_size=choose_batch_size(batch_size, dev, HOG_AUTO_BATCH))
    if target.startswith("gradhist:"):
        gh_params, digest = GradHistParams.parse(target)
        dev = resolve_device(device)
        resolve_precision(precision, dev)  # validated; gradhist always runs in fp32
        return GradHistEncoder(gh_params, name=name or ("gradhist" if gh_params == GradHistParams() else slug(gh_params.spec)),
                               spec=spec, device=dev, digest=digest,
                               batch_size=choose_batch_size(batch_size, dev, GRADHIST_AUTO_BATCH))

    expected = None
    if is_local_id(target):
        if checkpoint is None:
            raise ModelLoadError(_no_checkpoint_message(target))
        expected, name, target = target, local_name(target), str(checkpoint)
    source = resolve_source(target, name)
    family = family_for_model_type(read_config(source).get("model_type"), source.model_id)
    source = identified(source)
    if expected is not None and source.model_id != expected:
        raise ModelLoadError(f"{checkpoint} holds other weights ({source.model_id}) than the collection was "
                             f"built with ({expected}): pass the checkpoint it was synced with")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    bs = choose_batch_size(batch_size, dev)
    preprocess = Preprocess.from_processor(load_processor(source), source.model_id)
    model = load_model(family.model_class, source)
    return HFEncoder(source=source, spec=source.model_id if source.is_dir else spec, family=family, model=model,
                     preprocess=preprocess, device=dev, precision=prec, batch_size=bs)
