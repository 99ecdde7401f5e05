import numpy as np
import pytest
import torch

from m3d.dataset import discover, point_id
from m3d.errors import M3DError
from m3d.evaluate import ranking_metrics
from m3d.pooling import POOLS, pool


def _tree(root, layout):
    for rel in layout:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("OFF\n")
    return root


def test_discover_modelnet_and_plain_layouts(tmp_path):
    root = _tree(tmp_path / "ds", [
        "chair/train/chair_0002.off", "chair/train/chair_0001.off", "chair/test/chair_0100.off",
        "table/train/table_0001.OFF", "Cup/3.off", "README.txt", "stray.off", "chair/train/notes.md",
    ])
    files, skips = discover(root)
    assert [f.rel_path for f in files] == [
        "Cup/3.off", "chair/test/chair_0100.off", "chair/train/chair_0001.off", "chair/train/chair_0002.off",
        "table/train/table_0001.OFF"]
    assert [(f.label, f.split) for f in files][:2] == [("Cup", None), ("chair", "test")]
    assert [s.rel_path for s in skips] == ["stray.off"]
    assert files[0].point_id == point_id("ds", "Cup/3.off") != point_id("ds", "cup/3.off") != point_id("other", "Cup/3.off")
    assert discover(root, dataset="renamed")[0][0].point_id == point_id("renamed", "Cup/3.off")

    train = discover(root, split="train", per_class=1)[0]
    assert [f.rel_path for f in train] == ["chair/train/chair_0001.off", "table/train/table_0001.OFF"]
    assert [f.rel_path for f in discover(root, classes=["CHAIR"], limit=2)[0]] == [
        "chair/test/chair_0100.off", "chair/train/chair_0001.off"]
    with pytest.raises(M3DError, match="sofa"):
        discover(root, classes=["chair", "sofa"])
    with pytest.raises(M3DError, match="not a directory"):
        discover(root / "nope")


def test_discover_survives_symlink_loop(tmp_path):
    root = _tree(tmp_path / "ds", ["a/x.off"])
    (root / "a" / "loop").symlink_to(root / "a")
    files, skips = discover(root)
    assert [f.rel_path for f in files] == ["a/x.off"]
    assert any("loop" in s.reason for s in skips)


def test_pools_are_unit_and_differ():
    views = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]]])
    outs = {name: pool(name, views)[0] for name in POOLS}
    for vec in outs.values():  # one unit vector, or (views) one unit vector per view
        np.testing.assert_allclose(torch.linalg.norm(vec, dim=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(outs["views"], torch.nn.functional.normalize(views[0], dim=-1), atol=1e-6)
    np.testing.assert_allclose(outs["mean"], np.array([2.0, 1.2]) / np.linalg.norm([2.0, 1.2]), atol=1e-6)
    np.testing.assert_allclose(outs["max"], np.array([1.0, 1.0]) / np.sqrt(2), atol=1e-6)
    # attention favours the views that agree with the mean: more weight on x than the mean gives
    assert outs["attn"][0] / outs["attn"][1] > outs["mean"][0] / outs["mean"][1]
    assert torch.equal(pool("attn", views), pool("attn", views))  # deterministic


def test_ranking_metrics_by_hand():
    # two tight pairs of classes a and b, plus one lone c
    vectors = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99], [-1, 0]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = np.array(["a", "a", "b", "b", "c"])
    m = ranking_metrics(vectors, labels, ks=(1, 2))
    np.testing.assert_allclose(m["precision"][1][:4], [1, 1, 1, 1])
    np.testing.assert_allclose(m["precision"][2][:4], [0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(m["ap"][:4], [1, 1, 1, 1])
    np.testing.assert_allclose(m["nn"][:4], [1, 1, 1, 1])
    # no other object of its class: undefined in every metric, not a 0 that drags p@k and NN down
    assert all(np.isnan(m[key][4]) for key in ("ap", "nn")) and all(np.isnan(p[4]) for p in m["precision"].values())
    assert m["scored"].tolist() == [True, True, True, True, False]
