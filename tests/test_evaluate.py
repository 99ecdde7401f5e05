"""Retrieval metrics on a real store: one convention for queries that cannot be answered."""

from __future__ import annotations

import numpy as np
import pytest

from m3d.evaluate import evaluate, ranking_metrics, score_queries
from m3d.pipeline import SyncOptions, sync
from m3d.render import ViewSettings
from m3d.store import open_session

from helpers import make_tree

HOG = SyncOptions(encoders=("hog",), pools=("mean",), workers=0, view=ViewSettings(views=4, size=96))


def test_a_class_with_one_member_is_excluded_from_every_metric(lpsb, tmp_path):
    tree = make_tree(lpsb, tmp_path / "meshes", {"Chair": 3, "Cup": 3, "Vase": 1})
    with open_session(tmp_path / "store") as session:
        sync(session, tree, HOG)
        (result,) = evaluate(session, latency_queries=2)
        assert result.objects == 7 and result.excluded == 1
        assert set(result.per_class) == {"Chair", "Cup"}  # the lone vase has no per-class row
        assert result.row()["excluded"] == 1
        # the collection's figures are the means over the six answerable queries, recomputed by hand
        index = session.exact("m3d_hog_mean")
        labels = {r.id: r.payload["class"] for r in session.vectors.records("m3d_hog_mean")}
        lab = np.array([labels[i] for i in index.ids])
        m = ranking_metrics(index.vectors, lab)
        keep = lab != "Vase"
        assert result.nn_accuracy == pytest.approx(float(m["nn"][keep].mean()))
        assert result.precision[5] == pytest.approx(float(m["precision"][5][keep].mean()))
        assert result.map == pytest.approx(float(m["ap"][keep].mean()))
        for key, value in (("ft", result.first_tier), ("st", result.second_tier), ("dcg", result.dcg)):
            assert value == pytest.approx(float(m[key][keep].mean())) and result.row()[key] == round(value, 4)
        # p@5 over 6 neighbours of which at most 2 share the class: never above 0.4 when scored right
        assert result.precision[5] <= 0.4 + 1e-9


def test_princeton_measures_by_hand():
    # collection: the query itself (column 0) and five others; the query's class "a" has C = 3 members,
    # so R = C - 1 = 2 relevant candidates. Row 0 ranks them a b a b b, row 1 ranks them b b a a b.
    labels = np.array(["a", "a", "b", "a", "b", "b"])
    sims = np.array([[-np.inf, 0.9, 0.8, 0.7, 0.6, 0.5],
                     [-np.inf, 0.7, 0.9, 0.6, 0.8, 0.5]])  # row 1: b(.9) b(.8) a(.7) a(.6) b(.5)
    m = score_queries(sims, np.array(["a", "a"]), labels, ks=(1, 5))
    np.testing.assert_allclose(m["nn"], [1, 0])
    np.testing.assert_allclose(m["ft"], [1 / 2, 0 / 2])  # relevant within the first R = 2
    np.testing.assert_allclose(m["st"], [2 / 2, 2 / 2])  # within the first 2R = 4
    # DCG: rank 1 counts 1, rank i > 1 counts 1/log2(i); the ideal puts both relevant first: 1 + 1/log2(2) = 2
    np.testing.assert_allclose(m["dcg"], [(1 + 1 / np.log2(3)) / 2, (1 / np.log2(3) + 1 / np.log2(4)) / 2])
    np.testing.assert_allclose(m["ap"], [(1 / 1 + 2 / 3) / 2, (1 / 3 + 2 / 4) / 2])
    np.testing.assert_allclose(m["precision"][5], [2 / 5, 2 / 5])
    # a perfect ranking scores 1 everywhere; a lone query is NaN in every one of them
    perfect = score_queries(np.array([[-np.inf, 0.9, 0.1, 0.8, 0.2, 0.3]]), np.array(["a"]), labels)
    assert all(float(perfect[key][0]) == 1.0 for key in ("nn", "ft", "st", "dcg", "ap"))
    lone = score_queries(np.array([[0.5, 0.4, -np.inf, 0.3, 0.2, 0.1]]), np.array(["c"]), labels)
    assert all(np.isnan(lone[key][0]) for key in ("nn", "ft", "st", "dcg", "ap")) and not lone["scored"][0]


def test_random_rotations_are_proper_and_yaw_keeps_the_up_axis():
    from m3d.evaluate import random_rotation
    from m3d.orientation import AXIS_ROTATIONS

    rng = np.random.default_rng(1)
    for up, stored in AXIS_ROTATIONS.items():
        turn = random_rotation(rng, "yaw", stored)
        axis = stored.T @ np.array([0.0, 1.0, 0.0])  # the file axis the stored pose turned up
        assert np.allclose(turn @ axis, axis) and np.isclose(np.linalg.det(turn), 1.0), up
        assert not np.allclose(turn, np.eye(3))
        anyway = random_rotation(rng, "any", stored)
        assert np.allclose(anyway @ anyway.T, np.eye(3)) and np.isclose(np.linalg.det(anyway), 1.0)
        assert not np.allclose(anyway @ axis, axis)


def test_eval_rotate_reports_rotated_beside_unrotated(lpsb, tmp_path):
    import json

    from typer.testing import CliRunner

    from m3d.cli import app
    from m3d.evaluate import rotation_robustness, score_queries

    tree = make_tree(lpsb, tmp_path / "meshes", {"Chair": 3, "Cup": 3, "Table": 3})
    store = tmp_path / "store"
    options = SyncOptions(encoders=("hog",), pools=("mean", "max"), workers=0,
                          view=ViewSettings(views=4, size=96, up="y"))
    with open_session(store) as session:
        sync(session, tree, options)
        results = rotation_robustness(session, ["m3d_hog_mean", "m3d_hog_max"], objects=5, seed=3, rotation="any")
        assert [r.queries for r in results] == [5, 5] and all(r.missing == 0 for r in results)
        mean = results[0]
        # the unrotated figures are the stored vectors' own, for the same five objects
        index = session.exact("m3d_hog_mean")
        labels = {r.id: r.payload["class"] for r in session.vectors.records("m3d_hog_mean")}
        lab = np.array([labels[i] for i in index.ids])
        ids = sorted(index.ids)
        picked = {ids[i] for i in np.random.default_rng(3).choice(len(ids), 5, replace=False)}
        rows = np.array([row for row, pid in enumerate(index.ids) if pid in picked])
        sims = index.vectors[rows] @ index.vectors.T
        sims[np.arange(5), rows] = -np.inf
        m = score_queries(sims, lab[rows], lab)
        assert mean.unrotated["p@5"] == pytest.approx(float(np.mean(m["precision"][5])))
        assert mean.unrotated["map"] == pytest.approx(float(np.mean(m["ap"])))
        assert mean.rotated != mean.unrotated  # a turned chair is not the stored picture
    out = CliRunner().invoke(app, ["eval", "--store", str(store), "--rotate", "4", "--rotation", "yaw", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert {r["rotation"] for r in data["rotation"]} == {"yaw"} and data["rotation"][0]["queries"] == 4
    bad = CliRunner().invoke(app, ["eval", "--store", str(store), "--rotate", "4", "--rotation", "spin"])
    assert bad.exit_code == 2 and "spin" in bad.output and len(bad.output.strip().splitlines()) == 1
