"""gradhist, the weight-free shape descriptor: through load_encoder, on real renders of real meshes,
in a real sync and a real store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3d.encoders import ALIASES, FAMILIES, GradHistParams, ModelLoadError, load_encoder
from m3d.encoders.gradhist import load_whitening, raw_histograms

from helpers import make_tree, perturbed_copy


@pytest.fixture(scope="module")
def views(lpsb) -> np.ndarray:
    """8 ring views each of a real chair and a real airplane: (16, 224, 224, 3) uint8."""
    from m3d.meshio import load_mesh
    from m3d.render import ViewSettings, create_renderer

    renderer = create_renderer(ViewSettings(up="y"))
    try:
        return np.concatenate([renderer.render(load_mesh(lpsb / name)) for name in ("Chair/101.off", "Airplane/61.off")])
    finally:
        renderer.close()


def test_gradhist_loads_by_name_and_gives_unit_deterministic_vectors(views):
    enc = load_encoder("gradhist")
    fit = load_whitening()
    assert (enc.name, enc.spec, enc.dim, enc.precision) == ("gradhist", "gradhist", 128, "fp32")
    assert enc.model_id == f"{ALIASES['gradhist']}@{fit.digest}" and not FAMILIES["gradhist"].can_text
    out = enc.encode(views)
    assert out.shape == (16, 128) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(16), atol=1e-5, rtol=0)
    assert torch.equal(out, enc.encode(views))  # deterministic
    one_by_one = torch.cat([load_encoder("gradhist", batch_size=1).encode(v[None]) for v in views[:3]])
    torch.testing.assert_close(one_by_one, out[:3], atol=1e-5, rtol=0)  # a view does not depend on its batch
    sims = out @ out.T  # a chair's views resemble each other more than they resemble the airplane's
    chair, plane = sims[:8, :8], sims[:8, 8:]
    assert bool(((chair.sum(1) - 1) / 7 > plane.mean(1)).all()), (chair, plane)


def test_gradhist_spec_round_trip_and_bad_specs():
    enc = load_encoder("gradhist")
    again = load_encoder(enc.model_id)  # a fingerprint's model_id loads the same encoder
    assert (again.name, again.model_id, again.dim) == ("gradhist", enc.model_id, enc.dim)
    params, digest = GradHistParams.parse(enc.model_id)
    assert params == GradHistParams() and params.spec == ALIASES["gradhist"] and digest == load_whitening().digest
    raw = load_encoder("gradhist:s128-g16.8-sil8-o8-w0p25")  # no whitening: the raw histograms
    assert raw.dim == 8 * (16 * 16 + 8 * 8 + 8 * 8) and raw.model_id == "gradhist:s128-g16.8-sil8-o8-w0p25"
    assert load_encoder("gradhist:s128-g16.8-sil8-o8-w64p50").dim == 64  # fewer components of the same fit
    with pytest.raises(ModelLoadError, match="another fit"):
        load_encoder(ALIASES["gradhist"] + "@000000000000")
    with pytest.raises(ModelLoadError, match="other features"):
        load_encoder("gradhist:s64-g16.8-sil8-o8-w128p25")
    for bad in ("gradhist:s128", "gradhist:s100-g16.8-sil8-o8-w0p25", "gradhist:s128-g16.8-sil8-o8-w0p250"):
        with pytest.raises(ModelLoadError):
            load_encoder(bad)


def test_gradhist_ignores_how_dark_the_object_is(views):
    """A darker or lighter material scales every gradient by one factor: the square-rooted, normalised
    histograms cannot tell (up to float rounding, which the square root lifts near zero), and on
    uint8 renders only the rounding of the pixels differs."""
    grey = torch.from_numpy(views[..., 0]).float()[:, None] / 255.0
    silhouette = (grey < 1.0).float()
    params = GradHistParams()
    small = torch.nn.functional.interpolate(torch.cat([grey, silhouette], 1), size=(128, 128), mode="area")
    darker = 1.0 - 0.6 * (1.0 - small[:, :1])  # white stays white: the object's albedo changes
    torch.testing.assert_close(raw_histograms(darker, small[:, 1:], params),
                               raw_histograms(small[:, :1], small[:, 1:], params), atol=1e-3, rtol=0)
    enc = load_encoder("gradhist")
    dimmer = np.where(views == 255, 255, np.rint(255 - 0.6 * (255 - views.astype(np.float64)))).astype(np.uint8)
    same = (enc.encode(dimmer) * enc.encode(views)).sum(1)
    assert float(same.min()) > 0.97


def test_a_resaved_mesh_finds_itself_first_in_a_real_store(lpsb, tmp_path):
    from m3d.evaluate import evaluate
    from m3d.pipeline import SyncOptions, sync
    from m3d.render import ViewSettings
    from m3d.search import query
    from m3d.store import open_session

    tree = make_tree(lpsb, tmp_path / "meshes", {"Chair": 3, "Cup": 3, "Airplane": 3})
    options = SyncOptions(encoders=("gradhist",), pools=("mean",), workers=0, view=ViewSettings(up="y"))
    with open_session(tmp_path / "store") as session:
        sync(session, tree, options)
        assert session.collections() == ["m3d_gradhist_mean"]
        fp = session.fingerprint("m3d_gradhist_mean")
        assert fp.encoder == "gradhist" and fp.model_id == load_encoder("gradhist").model_id
        (result,) = evaluate(session, latency_queries=2)
        assert result.objects == 9 and 0.0 <= result.first_tier <= 1.0
        for label in ("Chair", "Cup", "Airplane"):
            original = sorted((tree / label / "train").glob("*.off"))[1]
            copy = perturbed_copy(original, tmp_path / "copies" / f"{label}.off", jitter=1e-4, seed=1)
            hits = query(session, copy, k=3, exact=True).hits
            assert hits[0].payload["path"] == f"{label}/train/{original.name}", (label, [h.payload["path"] for h in hits])
