"""Retrieval metrics on a real store: one convention for queries that cannot be answered."""

from __future__ import annotations

import numpy as np
import pytest

from m3d.evaluate import evaluate, ranking_metrics
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
        # p@5 over 6 neighbours of which at most 2 share the class: never above 0.4 when scored right
        assert result.precision[5] <= 0.4 + 1e-9
