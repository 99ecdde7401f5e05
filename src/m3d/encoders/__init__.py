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

from dataclasses import dataclass
from pathlib import Path

from m3d.errors import ModelLoadError

from .base import Encoder, TextEncoder
from .device import (PRECISIONS, choose_batch_size, cpu_has_fast_bf16, resolve_device, resolve_precision,
                     runnable_precision)
from .gradhist import GRADHIST_AUTO_BATCH, GradHistEncoder, GradHistParams
from .hog import HOG_AUTO_BATCH, HogEncoder, HogParams, hog_descriptor
from .hub import Source, identified, is_local_id, local_name, read_config, resolve_source, slug
from .preprocess import Preprocess, resize_uint8
from .registry import ALIASES, FAMILIES, Family, family_for_model_type

__all__ = [
    "ALIASES", "FAMILIES", "PRECISIONS", "Encoder", "EncoderIdentity", "Family", "GradHistParams", "HogParams",
    "ModelLoadError", "Preprocess", "TextEncoder", "cpu_has_fast_bf16", "family_of", "hog_descriptor", "identify",
    "is_local_id", "load_encoder", "resize_uint8", "resolve_device", "resolve_precision", "runnable_precision", "slug",
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


@dataclass(frozen=True)
class EncoderIdentity:
    """What a sync plans with (collection names, fingerprints, dims), read without loading weights:
    a hog spec, or a checkpoint's config.json (and, for a local directory, the digest of its files).
    It has the ``Encoder`` fields a plan reads, so targets are built from either."""

    name: str
    spec: str  # stored in the fingerprint: alias, hub id, hog spec, or a local checkpoint's model_id
    model_id: str
    dim: int
    family: Family
    precision: str  # what it computes in (part of the fingerprint)
    checkpoint: str | None = None  # a local directory: kept on this machine, never stored
    source: Source | None = None  # None for the weight-free encoders
    hog: HogParams | None = None
    gradhist: tuple[GradHistParams, str | None] | None = None  # parameters and the whitening fit's digest


def identify(spec: str, *, checkpoint: str | Path | None = None, device: str | None = None,
             precision: str | None = None) -> EncoderIdentity:
    """An encoder's identity by name, ``hog:...`` spec, hub id or checkpoint dir (see ``load_encoder``),
    in milliseconds: no transformers, no weights, and no torch unless a checkpoint's precision is left
    to the device and the device to the machine (then torch says whether CUDA is there). A local
    directory's weights are digested (cached per file signature) so a changed checkpoint is never taken
    for the one a collection was built with."""
    spec = spec.strip()
    name = spec if spec in ALIASES else None
    target = ALIASES.get(spec, spec)
    if target.startswith("hog:"):
        params = HogParams.parse(target)
        return EncoderIdentity(name or ("hog" if params == HogParams() else slug(params.spec)), spec, params.spec,
                               params.dim, FAMILIES["hog"], "fp32", hog=params)  # HOG always computes in fp32
    if target.startswith("gradhist:"):  # its model_id names the whitening fit m3d ships: built to read it
        gh_params, digest = GradHistParams.parse(target)
        encoder = GradHistEncoder(gh_params, name=name or ("gradhist" if gh_params == GradHistParams()
                                                           else slug(gh_params.spec)), spec=spec, device="cpu",
                                  digest=digest, batch_size=1)
        return EncoderIdentity(encoder.name, spec, encoder.model_id, encoder.dim, FAMILIES["gradhist"], "fp32",
                               gradhist=(gh_params, digest))
    expected = None
    if is_local_id(target):
        if checkpoint is None:
            raise ModelLoadError(_no_checkpoint_message(target))
        expected, name, target = target, local_name(target), str(checkpoint)
    source = resolve_source(target, name)
    config = read_config(source)
    family = family_for_model_type(config.get("model_type"), source.model_id)
    source = identified(source)
    if expected is not None and source.model_id != expected:
        raise ModelLoadError(f"{checkpoint} holds other weights ({source.model_id}) than the collection was "
                             f"built with ({expected}): pass the checkpoint it was synced with")
    auto = device in (None, "", "auto") and precision in (None, "", "auto")
    return EncoderIdentity(source.name, source.model_id if source.is_dir else spec, source.model_id,
                           family.config_dim(config), family,
                           resolve_precision(precision, resolve_device(None) if auto else device or "cpu"),
                           source.location if source.is_dir else None, source)


def load_encoder(
    spec: str | EncoderIdentity,
    *,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    checkpoint: str | Path | None = None,
) -> Encoder:
    """An encoder by name (``ALIASES``: clip, dinov2, hog, gradhist), ``hog:...`` or ``gradhist:...`` spec,
    hub id or checkpoint dir, or by the identity ``identify`` read (its weights are then loaded and checked
    against it).

    A stored local identity (``local:<name>@sha256:<digest>``, a fingerprint's ``encoder``) loads from
    ``checkpoint``, the directory holding those weights; other weights there are refused.
    ``device``/``precision``/``batch_size`` default to auto (cuda+fp16+256 / cpu+fp32+32).
    Raises ``ModelLoadError`` (one line) for anything the user can fix: uncached hub ids when the hub
    cannot be reached, missing directories, unsupported checkpoint families, a checkpoint that changed.
    """
    from .hf import HFEncoder, load_model, load_processor

    identity = (spec if isinstance(spec, EncoderIdentity) else
                identify(spec, checkpoint=checkpoint, device=device, precision=precision))
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)  # validated even for HOG, which always runs in fp32
    if identity.hog is not None:
        return HogEncoder(identity.hog, name=identity.name, spec=identity.spec, device=dev,
                          batch_size=choose_batch_size(batch_size, dev, HOG_AUTO_BATCH))
    if identity.gradhist is not None:
        gh_params, digest = identity.gradhist
        return GradHistEncoder(gh_params, name=identity.name, spec=identity.spec, device=dev, digest=digest,
                               batch_size=choose_batch_size(batch_size, dev, GRADHIST_AUTO_BATCH))
    source = identity.source
    bs = choose_batch_size(batch_size, dev)
    preprocess = Preprocess.from_processor(load_processor(source), source.model_id)
    model = load_model(identity.family.model_class, source)
    encoder = HFEncoder(source=source, spec=identity.spec, family=identity.family, model=model,
                        preprocess=preprocess, device=dev, precision=prec, batch_size=bs)
    if encoder.dim != identity.dim:
        raise ModelLoadError(f"{source.model_id}: its config.json says {identity.dim}-d vectors, its weights "
                             f"give {encoder.dim}-d")
    if encoder.precision != identity.precision:
        raise ModelLoadError(f"{source.model_id}: planned in {identity.precision}, loaded in {encoder.precision}")
    return encoder
