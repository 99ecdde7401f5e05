"""--pools views: every view of an object kept as one Qdrant multivector, compared by MaxSim.

Real LPSB meshes synced with the weight-free HOG encoder into real stores (qdrant-edge in a temp dir,
and the server code path through qdrant-client's in-process mode); the exact MaxSim every answer is
checked against is computed here from the stored view matrices with numpy, not with m3d's own code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import make_tree, needs_open3d
from m3d.cli import app
from m3d.connector import IndexSettings
from m3d.errors import UsageError
from m3d.evaluate import evaluate
from m3d.pipeline import SyncOptions, sync
from m3d.search import query, render_views
from m3d.store import open_session

CLASSES = {"Airplane": 3, "Chair": 3, "Cup": 3, "Table": 3}
VIEWS, MEAN = "m3d_hog_views", "m3d_hog_mean"
# index_threshold 0: Qdrant builds its HNSW graph over the multivectors, so recall is a finding
OPTIONS = SyncOptions(encoders=("hog",), pools=("mean", "views"), workers=0, index=IndexSettings(index_threshold=0))
runner = CliRunner()


@pytest.fixture(scope="module")
def synced(lpsb, tmp_path_factory):
    root = tmp_path_factory.mktemp("multiview")
    tree = make_tree(lpsb, root / "meshes", CLASSES)
    with open_session(root / "store") as session:
        sync(session, tree, OPTIONS)
    return tree, root / "store"


def _matrices(session, name: str) -> dict[str, np.ndarray]:
    return {r.id: r.vector for r in session.vectors.records(name, vectors=True)}


def _maxsim(query: np.ndarray, stored: np.ndarray) -> float:
    """The mean over the query's vectors of the best cosine with a stored view (both unit rows)."""
    return float((query @ stored.T).max(axis=1).mean())


def test_views_collection_holds_every_view_as_unit_rows(synced):
    _, store = synced
    with open_session(store) as session:
        assert (session.vectors.dim(VIEWS), session.vectors.views(VIEWS)) == (1764, 8)
        matrices = _matrices(session, VIEWS)
        assert len(matrices) == 12
        for matrix in matrices.values():
            assert matrix.shape == (8, 1764)
            np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
            assert np.linalg.matrix_rank(matrix) > 1  # eight different views, not one vector repeated
        index = session.exact(VIEWS)
        assert (index.dim, index.views, len(index)) == (8 * 1764, 8, 12)
        for pid, matrix in matrices.items():
            np.testing.assert_allclose(index.vectors[index.row(pid)], matrix.ravel(), atol=1e-6)
        assert all(row["ok"] for row in session.check())


def test_mesh_query_finds_itself_first_with_score_one(synced):
    tree, store = synced
    mesh = tree / "Chair" / "train" / "101.off"
    with open_session(store) as session:
        for exact in (False, True):
            result = query(session, mesh, collection=VIEWS, k=3, exact=exact)
            assert result.hits[0].payload["path"] == "Chair/train/101.off"
            assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)
            assert all(-1.0 - 1e-4 <= h.score <= 1.0 + 1e-4 for h in result.hits)  # a mean, not a sum of 8


def test_image_query_of_one_render_finds_its_object_and_maxsim_is_not_a_mean(synced, tmp_path):
    """One view of a stored object matches that view exactly: MaxSim gives 1.0. Compared with a mean
    over the object's views (what the mean pool stores) the same picture scores clearly less, so a
    views collection that averaged (or pooled) its views would fail here."""
    tree, store = synced
    mesh = tree / "Airplane" / "train" / "61.off"
    with open_session(store) as session:
        fp = session.fingerprint(VIEWS)
        stored_pose = next(r.payload["pose"] for r in session.vectors.records(VIEWS, fields=["path", "pose"])
                           if r.payload["path"] == "Airplane/train/61.off")
        views = render_views(mesh, fp, stored_pose)  # as the object was rendered when it was stored
        picture = tmp_path / "view3.png"
        Image.fromarray(views[3]).save(picture)
        for exact in (False, True):
            hit = query(session, image=picture, collection=VIEWS, k=2, exact=exact).hits[0]
            assert hit.payload["path"] == "Airplane/train/61.off"
            assert hit.score == pytest.approx(1.0, abs=1e-3)
        pooled = query(session, image=picture, collection=MEAN, k=1, exact=True).hits[0]
        assert pooled.payload["path"] == "Airplane/train/61.off" and pooled.score < 0.99
        stored = _matrices(session, VIEWS)[hit.id]
        assert _maxsim(stored[3:4], stored) == pytest.approx(1.0, abs=1e-4)
        mean = stored.mean(axis=0)
        assert float(stored[3] @ mean / np.linalg.norm(mean)) < 0.99


def test_qdrant_multivector_answers_equal_exact_maxsim(synced):
    """Every object, all its views as the query: Qdrant's ranking and shown scores are the exact MaxSim
    over the stored matrices (numpy here), and so are the FAISS side's."""
    _, store = synced
    with open_session(store) as session:
        matrices = _matrices(session, VIEWS)
        ids = sorted(matrices)
        queries = np.stack([matrices[i] for i in ids])
        answers = session.vectors.search(VIEWS, queries, 12)
        index = session.exact(VIEWS)
        exact_scores, exact_ids = index.search(queries, 12)
        for q, pid in enumerate(ids):
            want = {other: _maxsim(matrices[pid], matrices[other]) for other in ids}
            order = sorted(ids, key=lambda o: -want[o])
            got = [h.id for h in answers[q]]
            assert got[0] == pid and exact_ids[q][0] == pid
            assert set(got) == set(exact_ids[q]) == set(ids)
            for hit in answers[q]:
                assert hit.score == pytest.approx(want[hit.id], abs=1e-4)
            np.testing.assert_allclose(exact_scores[q], [want[o] for o in exact_ids[q]], atol=1e-4)
            assert [want[o] for o in got] == pytest.approx([want[o] for o in order], abs=1e-4)


def test_eval_ranks_by_maxsim_and_reports_recall_against_exact(synced):
    _, store = synced
    with open_session(store) as session:
        assert session.vectors.index_info(VIEWS).indexed > 0  # an HNSW graph answered, not a scan
        (result,) = evaluate(session, [VIEWS])
        assert result.recall == 1.0 and result.recall_queries == 12
        assert result.row()["recall@10"] == 1.0  # a graph was searched: shown as a figure
        matrices = _matrices(session, VIEWS)
        ids = sorted(matrices)
        labels = {r.id: r.payload["class"] for r in session.vectors.records(VIEWS, fields=["class"])}
        nn = [max((o for o in ids if o != pid), key=lambda o: _maxsim(matrices[pid], matrices[o])) for pid in ids]
        assert result.nn_accuracy == pytest.approx(np.mean([labels[a] == labels[b] for a, b in zip(ids, nn)]))


def test_server_code_path_stores_the_same_multivectors(synced, tmp_path):
    tree, store = synced
    with open_session(store) as session:
        embedded = _matrices(session, VIEWS)
    with open_session(tmp_path / "server", url=":memory:") as session:
        sync(session, tree, SyncOptions(encoders=("hog",), pools=("views",), workers=0))
        assert session.vectors.views(VIEWS) == 8
        served = _matrices(session, VIEWS)
        assert served.keys() == embedded.keys()
        for pid in served:
            np.testing.assert_allclose(served[pid], embedded[pid], atol=1e-5)
        result = query(session, tree / "Cup" / "train" / "22.off", collection=VIEWS, k=3)
        assert result.hits[0].payload["path"] == "Cup/train/22.off"
        assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)
        (evaluated,) = evaluate(session, [VIEWS])
        assert evaluated.recall == 1.0
        assert all(row["ok"] for row in session.check())


def test_neural_checkpoints_store_views_and_answer_text(lpsb, ckpts, tmp_path):
    """Tiny random CLIP and DINOv2 checkpoints: a views collection each (their own dims), a mesh
    finds itself, and a CLIP sentence is a one-vector query whose score is its best view's cosine."""
    tree = make_tree(lpsb, tmp_path / "meshes", {"Chair": 2, "Cup": 2})
    options = SyncOptions(encoders=(str(ckpts["clip"]), str(ckpts["dinov2"])), pools=("views",), workers=0,
                          precision="fp32")
    with open_session(tmp_path / "store") as session:
        sync(session, tree, options)
        names = session.collections()
        assert names == ["m3d_tiny_clip_views", "m3d_tiny_dinov2_views"]
        for name in names:
            assert session.vectors.views(name) == 8
            hit = query(session, tree / "Cup" / "train" / "22.off", collection=name, k=1).hits[0]
            assert hit.payload["path"] == "Cup/train/22.off" and hit.score == pytest.approx(1.0, abs=1e-3)
        result = query(session, text="a cup", collection="m3d_tiny_clip_views", k=4, exact=True)
        qdrant = query(session, text="a cup", collection="m3d_tiny_clip_views", k=4)
        exact = {h.id: h.score for h in result.hits}  # all four objects: the same scores, whatever the order of ties
        assert {h.id: h.score for h in qdrant.hits} == pytest.approx(exact, abs=1e-4)
        assert all(-1.0 <= h.score <= 1.0 for h in result.hits)


def test_check_sees_a_faiss_row_that_differs_and_info_shows_the_views(synced, tmp_path):
    _, store = synced
    result = runner.invoke(app, ["info", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["collection"]: r for r in json.loads(result.output)["collections"]}
    assert (rows[VIEWS]["dim"], rows[VIEWS]["vectors"]) == (1764, 8)
    assert (rows[MEAN]["dim"], rows[MEAN]["vectors"]) == (1764, 1)
    with open_session(store) as session:
        index = session.exact(VIEWS)
        row = np.array(index.vectors[0])
        row[:1764] = np.roll(row[:1764], 1)  # one view of one object changed in the FAISS file only
        index.upsert([index.ids[0]], row[None])
        checked = {r["collection"]: r for r in session.check()}
        assert not checked[VIEWS]["in_step"] and checked[MEAN]["ok"]
        repaired = {r["collection"]: r for r in session.check(repair=True)}
        assert repaired[VIEWS]["in_step"] and repaired[VIEWS]["ok"]


@needs_open3d
def test_dedup_proposes_from_the_mean_of_a_views_collections_views(synced):
    """A multivector has no single cosine: m3d dedup proposes each object's nearest others by the mean of
    its stored view vectors (computed here from the matrices), and geometry decides: the 12 different
    meshes are all measured and none is a duplicate."""
    from m3d.dedup import DedupOptions, find_duplicates

    _, store = synced
    with open_session(store) as session:
        result = find_duplicates(session, DedupOptions(collections=(VIEWS,), candidates=3))
        matrices = _matrices(session, VIEWS)
        paths = {r.id: r.payload["path"] for r in session.vectors.records(VIEWS, fields=["path"])}
    ids = list(matrices)
    means = np.stack([matrices[i].mean(axis=0) for i in ids])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    sims = means @ means.T
    np.fill_diagonal(sims, -np.inf)
    want = {tuple(sorted((paths[ids[q]], paths[ids[j]]))) for q in range(len(ids)) for j in np.argsort(-sims[q])[:3]}
    assert {tuple(sorted((c.a, c.b))) for c in result.checked} == want
    assert result.groups == [] and all(c.hausdorff is not None and c.kind is None for c in result.checked)


def test_padding_an_object_with_its_own_views_changes_no_maxsim_score():
    """An object some cameras did not see is stored with its shown views repeated up to the
    collection's view count: every MaxSim score against it stays what the shown views give."""
    import torch

    from m3d.maxsim import scores
    from m3d.pooling import pool

    rng = np.random.default_rng(0)
    shown = torch.tensor(rng.normal(size=(1, 3, 16)), dtype=torch.float32)
    padded = pool("views", shown, slots=8).numpy()[0]
    unit = torch.nn.functional.normalize(shown[0], dim=-1).numpy()
    np.testing.assert_allclose(padded, unit[[0, 1, 2, 0, 1, 2, 0, 1]], atol=1e-6)
    queries = rng.normal(size=(5, 4, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    got = scores(queries, padded.reshape(1, -1), 8)[:, 0]
    np.testing.assert_allclose(got, [_maxsim(q, unit) for q in queries], atol=1e-5)


def test_repair_writes_a_lost_m3d_json_again_with_its_views(synced, tmp_path):
    """A views collection whose m3d.json is gone: `m3d check --repair` reads the multivector's view
    count back from a stored point, so the collection stays a views collection."""
    import shutil

    _, store = synced
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    (copy / "qdrant" / VIEWS / "m3d.json").unlink()
    with open_session(copy) as session:
        session.check(repair=True)
        assert (session.vectors.dim(VIEWS), session.vectors.views(VIEWS)) == (1764, 8)
        assert all(row["ok"] for row in session.check())


def test_ring_pool_matches_a_turned_copy_under_its_best_shift(lpsb, tmp_path):
    """--pools ring keeps every cyclic order of the ring's (reduced) views: a copy of a chair turned by
    two camera steps (90 degrees of 8) about the up axis matches the original with score ~1 under the
    best shift, while the two objects' rings compared in the same order differ; Qdrant's answers are
    the exact ones (HNSW over the orders)."""
    from helpers import perturbed_copy
    from m3d.render import ViewSettings

    tree = make_tree(lpsb, tmp_path / "meshes", {"Chair": 2, "Airplane": 2})
    perturbed_copy(tree / "Chair" / "train" / "101.off", tree / "Turned" / "train" / "101.off", degrees=90)
    options = SyncOptions(encoders=("hog",), pools=("ring",), workers=0, view=ViewSettings(up="y"),
                          index=IndexSettings(index_threshold=0))
    with open_session(tmp_path / "store") as session:
        sync(session, tree, options)
        name = "m3d_hog_ring"
        assert (session.vectors.dim(name), session.vectors.views(name)) == (8 * 256, 8)
        for exact in (False, True):
            hits = query(session, tree / "Turned" / "train" / "101.off", collection=name, k=2, exact=exact).hits
            assert {h.payload["path"] for h in hits} == {"Turned/train/101.off", "Chair/train/101.off"}
            assert all(h.score == pytest.approx(1.0, abs=2e-3) for h in hits)
        by_path = {r.payload["path"]: r.id for r in session.vectors.records(name, fields=["path"])}
        rows = _matrices(session, name)
        original, turned = rows[by_path["Chair/train/101.off"]], rows[by_path["Turned/train/101.off"]]
        assert float(original[0] @ turned[0]) < 0.9  # the same ring order: other views face each other
        assert float((turned[:1] @ original.T).max()) == pytest.approx(1.0, abs=2e-3)
        (evaluated,) = evaluate(session, [name])
        assert evaluated.indexed > 0 and evaluated.recall == 1.0


def test_ring_pool_needs_a_ring_and_a_mesh(synced, tmp_path):
    from m3d.render import ViewSettings

    with pytest.raises(UsageError, match="needs --layout ring"):
        SyncOptions(encoders=("hog",), pools=("ring",), view=ViewSettings(layout="sphere", views=12))
    tree, _ = synced
    with open_session(tmp_path / "store") as session:
        sync(session, tree, SyncOptions(encoders=("hog",), pools=("ring",), workers=0))
        picture = tmp_path / "view.png"
        Image.new("RGB", (224, 224), (200, 200, 200)).save(picture)
        with pytest.raises(UsageError, match="views collection"):
            query(session, image=picture, collection="m3d_hog_ring")
