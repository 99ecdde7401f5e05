"""Encoders on real renders of real LPSB meshes, through the same load_encoder(path) code as hub ids.

Pretrained weights cannot be downloaded here, so CLIP/DINOv2 are tiny randomly initialised
checkpoints saved with the hub's own preprocessor configs; what is checked is the plumbing that
decides whether real weights give the right vectors: processor parity, the right output head,
family detection, precision, offline behaviour, and that ``hog`` really is skimage's HOG.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import save_random_checkpoint
from m3d.encoders import (
    ALIASES,
    FAMILIES,
    HogParams,
    ModelLoadError,
    cpu_has_fast_bf16,
    hog_descriptor,
    load_encoder,
    resize_uint8,
    resolve_precision,
)
from m3d.encoders.hub import transformers_quiet


@pytest.fixture(scope="session")
def renders(lpsb: Path) -> np.ndarray:
    """8 views each of a real chair and a real airplane: (16, 224, 224, 3) uint8."""
    from m3d.meshio import load_mesh
    from m3d.render import ViewSettings, create_renderer

    renderer = create_renderer(ViewSettings())
    try:
        views = [renderer.render(load_mesh(lpsb / name)) for name in ("Chair/101.off", "Airplane/61.off")]
    finally:
        renderer.close()
    out = np.concatenate(views)
    assert (out < 255).any(axis=(1, 2, 3)).all(), "blank render"
    return out


@pytest.fixture(scope="session")
def encoders(ckpts: dict[str, Path]) -> dict[str, object]:
    return {fam: load_encoder(str(path), precision="fp32") for fam, path in ckpts.items()}


def _hf_pixels(path: Path, images: np.ndarray) -> torch.Tensor:
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(path), backend="pil")
    return proc(list(images), return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------- loading, names, shapes


def test_registry_is_data() -> None:
    assert ALIASES["clip"] == "openai/clip-vit-base-patch32"
    assert ALIASES["dinov2"] == "facebook/dinov2-base"
    assert ALIASES["hog"].startswith("hog:")
    assert FAMILIES["clip"].model_types == ("clip",) and FAMILIES["clip"].can_text
    assert FAMILIES["clip_vision"].model_types == ("clip_vision_model",) and not FAMILIES["clip_vision"].can_text
    assert FAMILIES["dinov2"].model_types == ("dinov2",) and not FAMILIES["dinov2"].can_text
    assert not FAMILIES["hog"].can_text


def test_tiny_checkpoints_load_by_path(ckpts: dict[str, Path], encoders: dict, renders: np.ndarray) -> None:
    for fam, dim in (("clip", 24), ("dinov2", 32)):
        enc = encoders[fam]
        assert enc.name == f"tiny_{fam}"
        # the stored identity is the folder's name and a weights digest, never the local path
        assert re.fullmatch(rf"local:tiny_{fam}@sha256:[0-9a-f]{{16}}", enc.model_id) and enc.spec == enc.model_id
        assert enc.checkpoint == str(ckpts[fam]) and "/" not in enc.model_id
        assert (enc.dim, enc.device, enc.precision, enc.batch_size) == (dim, "cpu", "fp32", 32)
        out = enc.encode(renders)
        assert out.shape == (16, dim) and out.dtype == torch.float32 and out.device.type == "cpu"
        assert torch.isfinite(out).all()
        # chair views and airplane views are different inputs: the vectors must say so
        assert not torch.allclose(out[:8].mean(0), out[8:].mean(0), atol=1e-3)
    # precision auto is fp32 on every CPU, with or without native bf16 (same vectors on any machine)
    auto = load_encoder(str(ckpts["dinov2"]))
    assert auto.precision == "fp32"


def test_random_checkpoint_is_small_deterministic_and_hub_shaped(
    tmp_path: Path, ckpts: dict, renders: np.ndarray
) -> None:
    again = save_random_checkpoint("dinov2", tmp_path / "again")
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert (again / "model.safetensors").stat().st_size < 1_000_000
    assert json.loads((again / "config.json").read_text())["model_type"] == "dinov2"
    # the clip checkpoint is a full CLIPModel (text tower too), like the hub's
    assert json.loads((ckpts["clip"] / "config.json").read_text())["model_type"] == "clip"
    a = load_encoder(str(again), precision="fp32").encode(renders[:4])
    b = load_encoder(str(ckpts["dinov2"]), precision="fp32").encode(renders[:4])
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        save_random_checkpoint("vit", tmp_path / "x")


def test_encode_is_deterministic_and_batch_independent(ckpts: dict, encoders: dict, renders: np.ndarray) -> None:
    enc = encoders["dinov2"]
    full = enc.encode(renders)
    assert torch.equal(full, enc.encode(renders))
    small = load_encoder(str(ckpts["dinov2"]), precision="fp32", batch_size=3)
    assert small.batch_size == 3
    torch.testing.assert_close(small.encode(renders), full, atol=1e-5, rtol=1e-4)
    # torch input, a single HWC image and an empty batch take the same path
    torch.testing.assert_close(enc.encode(torch.from_numpy(renders[:2])), full[:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.encode(renders[5]), full[5:6], atol=1e-5, rtol=1e-4)
    assert enc.encode(renders[:0]).shape == (0, enc.dim)
    with pytest.raises(ValueError):
        enc.encode(renders.astype(np.float32))


# ---------------------------------------------------------------- preprocessing parity


@pytest.mark.parametrize("fam", ["clip", "dinov2"])
def test_tensor_preprocessing_matches_hf_processor(fam: str, ckpts: dict, encoders: dict, renders: np.ndarray) -> None:
    ref = _hf_pixels(ckpts[fam], renders)
    mine = encoders[fam].pixel_values(renders)
    assert mine.shape == ref.shape == (16, 3, 224, 224)
    diff = (mine - ref).abs()
    print(f"{fam} preprocessing vs HF processor: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() < 0.02 and diff.mean() < 1e-4
    # not a vacuous match: the processors differ (DINOv2 crops 256 -> 224, other mean/std)
    if fam == "dinov2":
        assert (mine - _hf_pixels(ckpts["clip"], renders)).abs().mean() > 0.05


@pytest.mark.parametrize("fam", ["clip", "dinov2"])
def test_preprocessing_parity_on_non_square_images(fam: str, ckpts: dict, encoders: dict, renders: np.ndarray) -> None:
    tall = np.ascontiguousarray(renders[[0, 9], :, 30:190])  # 224 x 160: shortest edge is the width
    ref = _hf_pixels(ckpts[fam], tall)
    mine = encoders[fam].pixel_values(tall)
    assert mine.shape == ref.shape
    assert (mine - ref).abs().max() < 0.02


def test_float_resize_path_matches_pil(renders: np.ndarray) -> None:
    """The path non-CPU devices take (float passes + uint8 rounding) agrees with PIL to 1 grey level."""
    from PIL import Image

    import m3d.encoders.preprocess as E

    x = torch.from_numpy(renders[:4]).permute(0, 3, 1, 2)
    floaty = E._resize_float(x, (256, 256), "bicubic")
    cpu = resize_uint8(x, (256, 256), "bicubic")
    pil = np.stack([np.asarray(Image.fromarray(im).resize((256, 256), Image.BICUBIC)) for im in renders[:4]])
    pil_t = torch.from_numpy(pil).permute(0, 3, 1, 2)
    assert torch.equal(cpu, pil_t)  # the CPU uint8 kernel is PIL's resampler
    d = (floaty.int() - pil_t.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3


# ---------------------------------------------------------------- the right output heads


def test_clip_returns_projected_image_embeds(ckpts: dict, encoders: dict, renders: np.ndarray) -> None:
    from transformers import CLIPVisionModelWithProjection

    with transformers_quiet():
        model = CLIPVisionModelWithProjection.from_pretrained(str(ckpts["clip"])).eval()
    with torch.inference_mode():
        out = model(pixel_values=_hf_pixels(ckpts["clip"], renders))
    mine = encoders["clip"].encode(renders)
    assert out.image_embeds.shape == mine.shape == (16, 24) and out.last_hidden_state.shape[-1] == 32
    torch.testing.assert_close(mine, out.image_embeds, atol=1e-4, rtol=1e-4)


def test_clip_vision_only_checkpoint_is_detected(
    tmp_path: Path, ckpts: dict, encoders: dict, renders: np.ndarray
) -> None:
    from transformers import CLIPVisionModelWithProjection

    vision = tmp_path / "clip-vision"
    with transformers_quiet():
        CLIPVisionModelWithProjection.from_pretrained(str(ckpts["clip"])).save_pretrained(vision)
    (vision / "preprocessor_config.json").write_text((ckpts["clip"] / "preprocessor_config.json").read_text())
    assert json.loads((vision / "config.json").read_text())["model_type"] == "clip_vision_model"
    enc = load_encoder(str(vision), precision="fp32")
    assert enc.name == "clip_vision"
    torch.testing.assert_close(enc.encode(renders[:4]), encoders["clip"].encode(renders[:4]), atol=1e-5, rtol=1e-4)


def test_dinov2_returns_cls_token(ckpts: dict, encoders: dict, renders: np.ndarray) -> None:
    from transformers import Dinov2Model

    with transformers_quiet():
        model = Dinov2Model.from_pretrained(str(ckpts["dinov2"])).eval()
    with torch.inference_mode():
        hidden = model(pixel_values=_hf_pixels(ckpts["dinov2"], renders)).last_hidden_state
    assert hidden.shape[1] == 1 + 16 * 16  # CLS + 224/14 squared patches: the crop really is 224
    mine = encoders["dinov2"].encode(renders)
    torch.testing.assert_close(mine, hidden[:, 0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(mine, hidden[:, 1:].mean(1), atol=1e-2)


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("fam", ["clip", "dinov2"])
def test_bf16_matches_fp32(fam: str, ckpts: dict, encoders: dict, renders: np.ndarray) -> None:
    bf16 = load_encoder(str(ckpts[fam]), precision="bf16")
    assert bf16.precision == "bf16"
    a, b = encoders[fam].encode(renders), bf16.encode(renders)
    assert b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    print(f"{fam} bf16 vs fp32 cosine: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= 0.999
    assert not torch.equal(a, b)  # it really ran in bf16


@pytest.mark.parametrize("native_bf16", [False, True])
def test_cpu_default_precision_does_not_depend_on_the_cpu(native_bf16: bool, monkeypatch) -> None:
    """Both CPU kinds forced: the default is fp32 whether or not the CPU computes bf16 natively."""
    import m3d.encoders.device as device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: native_bf16)
    assert device.resolve_precision(None, "cpu") == device.resolve_precision("auto", "cpu") == "fp32"
    assert device.resolve_precision("bf16", "cpu") == "bf16"  # on request


def test_device_and_precision_options() -> None:
    assert resolve_precision(None, "cuda") == "fp16"
    assert isinstance(cpu_has_fast_bf16(), bool)
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ModelLoadError, match="precision"):
        load_encoder("hog", precision="fp8")
    with pytest.raises(ModelLoadError, match="batch size"):
        load_encoder("hog", batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_encoder("hog", device="cuda")


# ---------------------------------------------------------------- errors


def test_unknown_family_and_bad_directories(tmp_path: Path) -> None:
    vit = tmp_path / "some-vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelLoadError) as err:
        load_encoder(str(vit))
    msg = str(err.value)
    assert "'vit'" in msg and "clip" in msg and "dinov2" in msg and "\n" not in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_encoder(str(empty))
    with pytest.raises(ModelLoadError, match="not found"):
        load_encoder(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ModelLoadError, match="neither"):
        load_encoder("not a model id!")


_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, shutil, socket, sys, time
    from pathlib import Path

    attempts = []
    def refuse(self, address, *a, **k):
        attempts.append(str(address))
        raise OSError("network disabled by test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse

    t = time.perf_counter()
    from m3d.encoders import load_encoder, ModelLoadError
    try:
        load_encoder("facebook/dinov2-small")
        error = None
    except ModelLoadError as e:
        error = str(e)
    missing_s = time.perf_counter() - t

    # a hub id that IS in the HF cache loads offline, named by its slug
    snap = Path(sys.argv[1]) / "hub" / "models--m3d-test--tiny-dinov2"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    shutil.copytree(sys.argv[2], snap / "snapshots" / ("0" * 40))
    enc = load_encoder("m3d-test/tiny-dinov2", precision="fp32")
    # the snapshot directory itself is named after the repo, not its commit hash
    assert load_encoder(str(snap / "snapshots" / ("0" * 40))).name == "m3d_test_tiny_dinov2"
    import numpy as np
    vec = enc.encode(np.full((1, 224, 224, 3), 255, np.uint8))
    print(json.dumps({"error": error, "missing_s": missing_s, "attempts": attempts, "name": enc.name,
                      "model_id": enc.model_id, "shape": list(vec.shape)}))
    """
)


def test_uncached_hub_id_fails_at_once_without_network(tmp_path: Path, ckpts: dict) -> None:
    """No HF_HUB_OFFLINE in the environment and no network: one quick probe, then a one-line error."""
    unset = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "M3D_ALLOW_DOWNLOAD", "HF_HUB_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["HF_HOME"] = str(tmp_path / "hf")
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, env["HF_HOME"], str(ckpts["dinov2"])],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"uncached hub id -> ModelLoadError after {result['missing_s']:.2f} s (incl. imports)")
    msg = result["error"]
    assert msg and "\n" not in msg
    assert "facebook/dinov2-small" in msg and "not available offline" in msg
    assert "`hf download facebook/dinov2-small`" in msg and "`hog`" in msg and "local checkpoint" in msg
    assert len(result["attempts"]) <= 1  # at most one reachability probe, no download retries
    cached = (result["name"], result["model_id"], result["shape"])
    assert cached == ("m3d_test_tiny_dinov2", "m3d-test/tiny-dinov2", [1, 32])


# ---------------------------------------------------------------- HOG


def test_hog_is_skimage_hog(renders: np.ndarray) -> None:
    from skimage.feature import hog

    enc = load_encoder("hog")
    assert (enc.name, enc.model_id, enc.dim, enc.precision) == ("hog", "hog:ppc8-cpb2-o9-s64", 1764, "fp32")
    images = renders[[0, 3, 8, 13]]
    gray = enc.gray(images)
    assert gray.shape == (4, 64, 64)
    mine = enc.encode(images)
    assert mine.shape == (4, 1764)
    torch.testing.assert_close(mine, hog_descriptor(gray, enc.params))
    ref = np.stack([
        hog(g.astype(np.float64), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm="L2-Hys")
        for g in gray.numpy()
    ])
    diff = np.abs(mine.numpy() - ref)
    corr = min(np.corrcoef(a, b)[0, 1] for a, b in zip(mine.numpy(), ref))
    print(f"hog vs skimage.feature.hog: max abs diff {diff.max():.2e}, min correlation {corr:.8f}")
    assert diff.max() < 1e-4 and corr > 0.99999
    assert (ref > 0).mean() > 0.2  # real content, not a vector of zeros


def test_hog_gray_and_resize_match_references(renders: np.ndarray) -> None:
    from PIL import Image
    from skimage.color import rgb2gray

    enc = load_encoder("hog:ppc16-cpb2-o9-s128")
    small = np.stack([np.asarray(Image.fromarray(im).resize((128, 128), Image.BILINEAR)) for im in renders[:4]])
    # at 128 px no resize happens: the grey conversion alone equals skimage's rgb2gray
    np.testing.assert_allclose(enc.gray(small).numpy(), rgb2gray(small), atol=1e-6)
    # the 224 -> 128 resize is PIL's antialiased bilinear (to 1 grey level on a few pixels)
    d = np.abs(enc.gray(renders[:4]).numpy() - rgb2gray(small))
    assert d.max() < 1.01 / 255 and (d > 1e-6).mean() < 0.01
    # a blank view has no gradients at all (no float noise amplified by L2-Hys)
    assert not enc.encode(np.full((2, 224, 224, 3), 255, np.uint8)).any()


def test_hog_specs() -> None:
    enc = load_encoder("hog:ppc32-cpb2-o9-s128", batch_size=7)
    assert (enc.name, enc.dim, enc.batch_size) == ("hog_ppc32_cpb2_o9_s128", 3 * 3 * 2 * 2 * 9, 7)
    assert load_encoder(ALIASES["hog"]).name == "hog"  # the fingerprint's model_id loads the same encoder
    assert HogParams.parse("hog:ppc8-cpb3-o12-s64").dim == 6 * 6 * 9 * 12
    with pytest.raises(ModelLoadError, match="HOG"):
        load_encoder("hog:ppc16")


# ---------------------------------------------------------------- text tower


def test_clip_text_embeds_are_get_text_features(ckpts: dict, encoders: dict) -> None:
    """The tiny tokenizer saved beside the tiny CLIP: encode_text is CLIPModel.get_text_features on the
    same tokens (the projected text embeds that share the image embeds' space)."""
    from transformers import AutoTokenizer, CLIPModel

    texts = ["a wooden chair with armrests", "table", "an airplane seen from the side"]
    with transformers_quiet():
        model = CLIPModel.from_pretrained(str(ckpts["clip"])).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(ckpts["clip"]))
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    ref = getattr(ref, "pooler_output", ref)  # transformers 5 returns an output object
    mine = encoders["clip"].encode_text(texts)
    assert mine.shape == (3, 24) == (3, encoders["clip"].dim)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mine[0], mine[1], atol=1e-3)  # different sentences, different vectors


def test_text_capability_comes_from_the_registry(tmp_path: Path, ckpts: dict, encoders: dict) -> None:
    from m3d.encoders import family_of

    assert family_of(str(ckpts["clip"])).can_text and not family_of(str(ckpts["dinov2"])).can_text
    assert not family_of("hog").can_text
    with pytest.raises(ModelLoadError, match="no text tower"):
        encoders["dinov2"].encode_text(["a chair"])
    no_tokenizer = tmp_path / "clip-no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (no_tokenizer / name).write_bytes((ckpts["clip"] / name).read_bytes())
    with pytest.raises(ModelLoadError, match="tokenizer") as err:
        load_encoder(str(no_tokenizer), precision="fp32").encode_text(["a chair"])
    assert "\n" not in str(err.value)
