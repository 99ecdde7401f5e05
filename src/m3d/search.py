"""Query a collection with a mesh: embed it with exactly the settings stored in the collection's
fingerprint (renderer, views, resolution, encoder, pool), then ask Qdrant or FAISS."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .connector import Hit
from .errors import MeshError, StoreError
from .meshio import Mesh, load_mesh
from .orientation import pose
from .render import create_renderer, posed
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


def render_views(mesh_path: Path, fp: Fingerprint, stored_pose: dict | None = None) -> np.ndarray:
    """A mesh rendered exactly as the collection's objects were: with the rotation a stored object
    recorded (stored_pose), or, for a new mesh, the pose the collection's settings give it."""
    mesh = load_named(mesh_path)
    rotation = np.asarray(stored_pose["rotation"]) if stored_pose else pose(mesh, fp.view).rotation
    renderer = create_renderer(fp.view)
    try:
        return renderer.render(posed(mesh, rotation))
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
          label: str | None = None, exact: bool = False, up: str | None = None) -> QueryResult:
    """up names the query mesh's up axis when it does not follow the collection's rule."""
    name = choose_collection(session, collection)
    fp = session.fingerprint(name)
    if fp is None:
        raise StoreError(f"collection {name} is empty")
    view = fp.view if up is None else replace(fp.view, up=up)
    views = render_views(mesh_path, replace(fp, view=view))
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
