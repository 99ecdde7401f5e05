"""Query a collection the three ways people ask: with a mesh, a picture, or a sentence.

- mesh: rendered and encoded with exactly the settings in the collection's fingerprint (renderer,
  views, resolution, encoder, pool), like every stored object;
- image: a photo or sketch made into one view as a render would be (RGB on the render background,
  centred on a square, the render size) and encoded by the collection's encoder; any encoder;
- text: a sentence through the encoder's text tower (CLIP), whose projected embeds share the image
  embeds' space; only collections whose encoder family has one can answer.

The vector then goes to Qdrant, or FAISS with ``exact``. A views collection (one multivector per
object) gets every view of a mesh, the one view of a picture, or the sentence as one vector, and
ranks by MaxSim: the score is the mean over the query's vectors of its best-matching stored view.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .connector import Hit, SearchSettings
from .maxsim import scores as scores_of
from .errors import M3DError, MeshError, ModelLoadError, StoreError, UsageError
from .meshio import Mesh, load_mesh
from .orientation import DatasetUp, pose, stored_consensus
from .render import BACKGROUND, create_renderer, posed
from .schemas import Fingerprint
from .store import Session

QUERY_KINDS = ("mesh", "image", "text")
TEXT_HINT = "sync with a CLIP encoder (--encoders clip) to search by text"


@dataclass(frozen=True)
class Query:
    """One query: exactly one of a mesh file, an image file, or a sentence; ``up`` (the mesh's up
    axis) only with a mesh, since a picture or a sentence has no axis to turn."""

    mesh: Path | None = None
    image: Path | None = None
    text: str | None = None
    up: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in QUERY_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise UsageError("give exactly one query: a MESH file, --image FILE or --text \"...\""
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.text is not None and not self.text.strip():
            raise UsageError("--text is empty: say what to look for, e.g. --text \"a wooden chair\"")
        if self.up is not None and self.mesh is None:
            raise UsageError("--up names the up axis of a MESH query; an --image or --text query has none")

    @property
    def kind(self) -> str:
        return next(k for k in QUERY_KINDS if getattr(self, k) is not None)

    @property
    def title(self) -> str:
        return self.text if self.text is not None else (self.mesh or self.image).name


@dataclass
class QueryResult:
    collection: str
    engine: str  # "qdrant" or "faiss"
    hits: list[Hit]
    views: np.ndarray | None  # what was encoded (mesh renders, the image as a view), for galleries
    kind: str = "mesh"


def load_named(mesh_path: Path) -> Mesh:
    """load_mesh for a file the user named: the error says which file."""
    try:
        return load_mesh(mesh_path)
    except MeshError as exc:
        raise MeshError(f"{mesh_path}: {exc}") from None


def render_views(mesh_path: Path, fp: Fingerprint, stored_pose: dict | None = None,
                 dataset: DatasetUp | None = None) -> np.ndarray:
    """A mesh rendered exactly as the collection's objects were: with the rotation a stored object
    recorded (stored_pose), or, for a new mesh, the pose the collection's rule gives it (with --up
    auto: its own evidence under the collection's consensus, `dataset`)."""
    return render_mesh(load_named(mesh_path), fp, stored_pose, dataset, suffix=mesh_path.suffix)


def render_mesh(mesh: Mesh, fp: Fingerprint, stored_pose: dict | None = None,
                dataset: DatasetUp | None = None, suffix: str = "") -> np.ndarray:
    rotation = (np.asarray(stored_pose["rotation"]) if stored_pose
                else pose(mesh, fp.view, dataset, suffix=suffix).rotation)
    renderer = create_renderer(fp.view)
    try:
        return renderer.render(posed(mesh, rotation))
    finally:
        renderer.close()


def collection_consensus(session: Session, name: str) -> DatasetUp | None:
    """The up-axis consensus of a collection's objects (auto collections keep each object's evidence)."""
    return stored_consensus(rec.payload for rec in session.vectors.records(name, fields=["pose", "path"]))


def image_view(image_path: Path, size: int) -> np.ndarray:
    """A picture as one render-like view: (1, size, size, 3) uint8, transparency on the render
    background, centred on a background square (aspect kept, nothing cropped), resized with PIL."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image_path) as img:
            img.load()
            rgba = img.convert("RGBA")
    except FileNotFoundError:
        raise UsageError(f"{image_path}: no such image file") from None
    except Image.DecompressionBombError as exc:  # a tiny file claiming billions of pixels
        raise UsageError(f"{image_path}: too large to read as an image ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"{image_path}: not an image this can read ({exc})") from None
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (BACKGROUND,) * 3 + (255,))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    rgb = canvas.convert("RGB")
    if side != size:
        rgb = rgb.resize((size, size), Image.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)[None]


def collection_encoder(session: Session, fp: Fingerprint, *, checkpoint: Path | None = None,
                       device: str | None = None):
    """The encoder that made a collection, computing in the precision the collection was built with
    (where the device can); a local checkpoint loads from the path this store remembered at sync time
    (or ``checkpoint``), and must hold the same weights."""
    from .encoders import load_encoder, resolve_device, runnable_precision

    where = checkpoint or session.checkpoints().get(fp.encoder)
    dev = resolve_device(device)
    return load_encoder(fp.encoder, device=dev, precision=runnable_precision(fp.precision, dev), checkpoint=where)


def can_answer_text(session: Session, name: str, checkpoint: Path | None = None) -> bool:
    """Whether a collection's encoder family has a text tower (read from config.json, no weights).
    Raises ModelLoadError when that cannot be told here (a local checkpoint this store cannot find,
    a hub id that is not cached): such a collection may well have one."""
    from .encoders import family_of

    fp = session.fingerprint(name)
    if fp is None:
        return False
    return family_of(fp.encoder, checkpoint=checkpoint or session.checkpoints().get(fp.encoder)).can_text


def choose_collection(session: Session, collection: str | None, kind: str = "mesh",
                      checkpoint: Path | None = None) -> str:
    """The named collection, or the first mean-pooled one that can answer this kind of query."""
    names = session.collections()
    if not names:
        raise StoreError(f"{session.vectors.location} has no collections yet: run `m3d sync DIR` first")
    if collection:
        session.require(collection)
    if kind != "text":
        return collection or ([n for n in names if n.endswith("_mean")] or names)[0]
    from .encoders import is_local_id

    def unreadable(name: str, exc: M3DError) -> str:
        moved = " (pass --checkpoint DIR if its checkpoint moved)" if is_local_id(session.fingerprint(name).encoder) else ""
        return f"{exc}{moved}"

    if collection:
        try:
            if can_answer_text(session, collection, checkpoint):
                return collection
        except M3DError as exc:
            raise ModelLoadError(f"{collection}: its encoder cannot be read here: {unreadable(collection, exc)}") from None
    able, unknown = [], {}
    for n in names:
        try:
            if can_answer_text(session, n, checkpoint):
                able.append(n)
        except M3DError as exc:
            unknown[n] = unreadable(n, exc)
    maybe = next(iter(unknown), None)  # not "none can": this one may, once its encoder is found here
    if able:
        answer = f"collections that can: {', '.join(able)}"
    elif maybe:
        answer = f"{maybe} may, but its encoder cannot be read here: {unknown[maybe]}"
    else:
        answer = f"none here can: {TEXT_HINT}"
    if collection:
        raise UsageError(f"collection {collection} cannot answer a text query (its encoder has no text tower); {answer}")
    if maybe and not able:
        raise ModelLoadError(f"no collection here is known to answer a text query; {answer}")
    if not able:
        raise UsageError(f"no collection here can answer a text query (no encoder with a text tower); {TEXT_HINT}")
    return ([n for n in able if n.endswith("_mean")] or able)[0]


def query_vector(session: Session, q: Query, fp: Fingerprint, *, checkpoint: Path | None = None,
                 device: str | None = None, dataset: DatasetUp | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The unit query vector in the collection's space, and the views it came from (None for text);
    a mesh is posed by the collection's rule (`dataset`: its up-axis consensus, for --up auto). For a
    views collection: (m, dim), one unit row per view shown (a text: one row)."""
    import torch

    from .pooling import MULTIVECTOR, pool

    if q.kind == "mesh":
        views = render_views(q.mesh, fp, dataset=dataset)  # before loading the encoder: a bad mesh fails fast
    elif q.kind == "image":
        views = image_view(q.image, fp.view.size)
    encoder = collection_encoder(session, fp, checkpoint=checkpoint, device=device)
    if q.kind == "text":
        vector = torch.nn.functional.normalize(encoder.encode_text([q.text]).float(), dim=-1).cpu().numpy()
        return (vector if fp.pool in MULTIVECTOR else vector[0]), None
    per_view = encoder.encode(views)  # an image is one view: every pool of one view is that view
    return pool(fp.pool, per_view[None]).cpu().numpy()[0], views


def query(session: Session, mesh_path: Path | None = None, *, image: Path | None = None, text: str | None = None,
          collection: str | None = None, k: int = 5, label: str | None = None, exact: bool = False,
          up: str | None = None, checkpoint: Path | None = None,
          params: SearchSettings = SearchSettings()) -> QueryResult:
    """up names the query mesh's up axis when it does not follow the collection's rule; checkpoint is
    the directory of a collection's local checkpoint when this store does not remember it."""
    from .encoders import is_local_id

    q = Query(mesh=mesh_path, image=image, text=text, up=up)
    name = choose_collection(session, collection, q.kind, checkpoint)
    fp = session.fingerprint(name)
    if fp is None:
        raise StoreError(f"collection {name} is empty")
    if checkpoint is not None and not is_local_id(fp.encoder):  # it would be ignored: say so
        raise UsageError(f"--checkpoint is for a collection synced from a local checkpoint; {name} was built "
                         f"with {fp.model_id}, which m3d finds by itself")
    if label is not None:  # an unknown class is a typo, not "no neighbours"
        classes = session.vectors.facet(name, "class")
        if label not in classes:
            near = sorted(classes, key=lambda c: (c.lower() != label.lower(), c))[:5]
            raise UsageError(f"no class {label!r} in {name}; classes include: {', '.join(near)}")
    view = fp.view if up is None else replace(fp.view, up=up)
    dataset = collection_consensus(session, name) if q.kind == "mesh" and view.up == "auto" else None
    vector, views = query_vector(session, q, replace(fp, view=view), checkpoint=checkpoint, dataset=dataset)
    if not exact:
        hits = session.vectors.search(name, vector[None], k, label=label, params=params)[0]
        return QueryResult(name, "qdrant", hits, views, q.kind)
    index = session.exact(name)
    if label is None:
        scores, ids = index.search(vector[None], k)
        records = {r.id: r.payload for r in session.vectors.retrieve(name, ids[0])}
        hits = [Hit(i, float(s), records.get(i, {})) for i, s in zip(ids[0], scores[0])]
    else:  # exact answer within one class: score every member, keep the best k
        members = [r.id for r in session.vectors.records(name, fields=["class"]) if r.payload.get("class") == label]
        member_rows = np.array([index.row(m) for m in members if index.row(m) is not None], dtype=int)
        scores = scores_of(vector[None], index.vectors[member_rows], index.views)[0] if len(member_rows) else np.zeros(0)
        top = np.argsort(-scores, kind="stable")[:k]
        chosen = [index.ids[member_rows[t]] for t in top]
        records = {r.id: r.payload for r in session.vectors.retrieve(name, chosen)}
        hits = [Hit(i, float(scores[t]), records.get(i, {})) for i, t in zip(chosen, top)]
    return QueryResult(name, "faiss", hits, views, q.kind)
