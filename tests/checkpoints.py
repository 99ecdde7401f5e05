"""Random checkpoints for tests and benchmarks: the same files as a hub checkpoint, random weights.

Pretrained weights cannot be downloaded everywhere; these let tests and benchmarks exercise the
exact ``load_encoder(path)`` code path that hub checkpoints take. Not part of the installed package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


_RANDOM_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    # full CLIPModel like the hub checkpoint (model_type "clip"): vision tower for views, text tower for text
    ("clip", "tiny"): {
        "text_config": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=24, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1),  # the ids of save_tiny_tokenizer's specials
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


# A tiny byte-level BPE vocabulary in CLIP's format: the two specials (ids 0 and 1, as the tiny text
# config says), every byte as a word piece and as a word end, and a few merges, so real sentences
# tokenise through CLIPTokenizer's own code into ids below the tiny vocab_size.
TINY_MERGES = ["c h", "a i", "ai r</w>", "ch air</w>", "t a", "b l", "bl e</w>", "ta ble</w>", "o o", "w oo"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + n) for n in range(len(extra))]


def save_tiny_tokenizer(directory: Path) -> None:
    """Write a CLIPTokenizer built offline from ``TINY_MERGES`` (vocab.json, merges.txt, tokenizer.json)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in _bytes_to_unicode() + [c + "</w>" for c in _bytes_to_unicode()] + [m.replace(" ", "") for m in TINY_MERGES]:
        vocab.setdefault(piece, len(vocab))
    CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in TINY_MERGES]).save_pretrained(str(directory))


def save_random_checkpoint(family: str, directory: str | Path, size: str = "tiny", *, seed: int = 0,
                           tokenizer: bool = False) -> Path:
    """Write a randomly initialised ``clip``/``dinov2`` checkpoint (+ the hub's preprocessor config, and
    with ``tokenizer`` a tiny CLIP tokenizer) to ``directory``; return its absolute path. ``size``:
    "tiny" (~100s of KB) or "base" (real ViT-B)."""
    import torch
    import transformers

    from m3d.encoders.hub import transformers_quiet

    if (family, size) not in _RANDOM_CONFIGS:
        raise ValueError(f"no random checkpoint for family={family!r} size={size!r}; "
                         f"choose from {sorted(_RANDOM_CONFIGS)}")
    cfg = _RANDOM_CONFIGS[(family, size)]
    if family == "clip":
        with transformers_quiet():
            config = transformers.CLIPConfig(**cfg)
        model_cls = transformers.CLIPModel
    else:
        config = transformers.Dinov2Config(**cfg)
        model_cls = transformers.Dinov2Model
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), transformers_quiet():
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR[family], indent=2) + "\n")
    if tokenizer:
        save_tiny_tokenizer(path)
    return path
