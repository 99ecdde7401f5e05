"""Query a collection with a mesh: embed it with exactly the settings stored in the collection's
fingerprint (renderer, views, resolution, encoder, pool), then ask Qdrant or FAISS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .connector import Hit
from .errors import MeshError, StoreError
from .meshio import Mesh, load_mesh
from .render import ViewSettings, create_renderer
from .schemas import Fingerprint
from .store import Session


@dataclass
class QueryResult:
    collection: str
    engine: str  # "qdrant" or "faiss"
    hits: list[Hit]
    views: np.ndarray  # the query's renders, for galleries


def load_named(mesh_path: Path) -> Mesh:
    """load_mesh for a file the user named: the error says which file."""
    try:
        return load_mesh(mesh_path)
    except MeshError as exc:
        raise MeshError(f"{mesh_path}: {exc}") from None


def render_views(mesh_path: Path, fp: Fingerprint) -> np.ndarray:
    """The query mesh rendered exactly as the collection's objects were."""
    mesh = load_named(mesh_path)
    renderer = create_renderer(fp.renderer, ViewSettings(views=fp.views, elevation=fp.elevation, size=fp.resolution))
    try:
        return renderer.render(mesh)
    finally:
        renderer.close()


def embed_views(views: np.ndarray, fp: Fingerprint, *, device: str | None = None) -> np.ndarray:
    from .encoders import load_encoder
    from .pooling import pool

    encoder = load_encoder(fp.encoder, device=device)
    per_view = encoder.encode(views)
    return pool(fp.pool, per_view[None]).cpu().numpy()[0]


def choose_collection(session: Session, collection: str | None) -> str:
    """The named collection, or the only one, or the first mean-pooled one (said in the output)."""
    names = session.collections()
    if collection:
        session.require(collection)
        return collection
    if not names:
        raise StoreError(f"{session.vectors.location} has no collections yet: run `m3d sync DIR` first")
    means = [n for n in names if n.endswith("_mean")]
    return (means or names)[0]


def query(session: Session, mesh_path: Path, *, collection: str | None = None, k: int = 5,
          label: str | None = None, exact: bool = False) -> QueryResult:
    name = choose_collection(session, collection)
    fp = session.fingerprint(name)
    if fp is None:
        raise StoreError(f"collection {name} is empty")
    views = render_views(mesh_path, fp)
    vector = embed_views(views, fp)
    if not exact:
        hits = session.vectors.search(name, vector[None], k, label=label)[0]
        return QueryResult(name, "qdrant", hits, views)
    index = session.exact(name)
    if label is None:
        scores, ids = index.search(vector[None], k)
        records = {r.id: r.payload for r in session.vectors.retrieve(name, ids[0])}
        hits = [Hit(i, float(s), records.get(i, {})) for i, s in zip(ids[0], scores[0])]
    else:  # exact answer within one class: score every member, keep the best k
        members = [r.id for r in session.vectors.records(name, fields=["class"]) if r.payload.get("class") == label]
        rows = {pid: row for row, pid in enumerate(index.ids)}
        member_rows = np.array([rows[m] for m in members if m in rows], dtype=int)
        scores = index.vectors[member_rows] @ vector if len(member_rows) else np.zeros(0)
        top = np.argsort(-scores, kind="stable")[:k]
        chosen = [index.ids[member_rows[t]] for t in top]
        records = {r.id: r.payload for r in session.vectors.retrieve(name, chosen)}
        hits = [Hit(i, float(scores[t]), records.get(i, {})) for i, t in zip(chosen, top)]
    return QueryResult(name, "faiss", hits, views)
