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

``Searcher`` holds the warm parts (encoders, renderers, per-collection state) for many queries (`m3d
serve`); ``query`` is one query through it (`m3d query`).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .connector import Hit, SearchSettings
from .maxsim import scores as scores_of
from .errors import M3DError, MeshError, ModelLoadError, StoreError, UsageError
from .meshio import DEFAULT_MAX_FACES, Mesh, load_mesh
from .orientation import UP_KEY, DatasetUp, merged, pose, scanned_consensus
from .render import BACKGROUND, create_renderer, posed
from .schemas import Fingerprint
from .store import Session

log = logging.getLogger("m3d")
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


def load_named(mesh_path: Path, max_faces: int = DEFAULT_MAX_FACES, standalone: bool = False) -> Mesh:
    """load_mesh for a file the user named: the error says which file."""
    try:
        return load_mesh(mesh_path, max_faces=max_faces, standalone=standalone)
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
    renderer = create_renderer(fp.view)
    try:
        return renderer.render(posed(mesh, rotation_of(mesh, fp, stored_pose, dataset, suffix)))
    finally:
        renderer.close()


def rotation_of(mesh: Mesh, fp: Fingerprint, stored_pose: dict | None = None, dataset: DatasetUp | None = None,
                suffix: str = "") -> np.ndarray:
    """The rotation a stored object recorded, or, for a new mesh, the one the collection's rule gives."""
    return (np.asarray(stored_pose["rotation"]) if stored_pose
            else pose(mesh, fp.view, dataset, suffix=suffix).rotation)


def collection_consensus(session: Session, name: str) -> DatasetUp | None:
    """The up rules a query mesh follows in a collection (None: none, the mesh goes alone): one read of
    the rules its syncs stored, whatever its size. A collection stored before rules were (or by another
    evidence model) is scanned for its points' evidence instead, until its next sync stores them."""
    records = session.vectors.metadata(name, UP_KEY)
    if isinstance(records, dict) and records:
        found = [DatasetUp.from_record(r) for r in records.values()]
        if all(f is not None for f in found):
            return merged(found)
    scanned = scanned_consensus((rec.id, rec.payload) for rec in session.vectors.records(name, fields=["pose", "path"]))
    if scanned is not None:  # its objects were posed by an older rule, which today's may not reproduce
        log.warning(
            "%s was synced before m3d stored its up rules: a query mesh is posed by today's rule, which may "
            "differ from how some of its objects were posed; run `m3d sync DIR` once (it embeds again only "
            "the objects whose up moved)", name)
    return scanned


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
    (or ``checkpoint``), and must hold the same weights. An encoder that loads here as another model
    than the collection records (a weight-free descriptor whose shipped fit changed with an upgrade) is
    refused: its vectors would not be comparable with the stored ones."""
    from .encoders import load_encoder, resolve_device, runnable_precision

    where = checkpoint or session.checkpoints().get(fp.encoder)
    dev = resolve_device(device)
    encoder = load_encoder(fp.encoder, device=dev, precision=runnable_precision(fp.precision, dev), checkpoint=where)
    if encoder.model_id != fp.model_id:
        raise ModelLoadError(f"{fp.encoder} loads here as {encoder.model_id}, but the collection was built with "
                             f"{fp.model_id}: its vectors are not comparable; run `m3d sync DIR --rebuild` to "
                             "embed it again with this one")
    return encoder


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
                      checkpoint: Path | None = None, can_text=None) -> str:
    """The named collection, or the first mean-pooled one that can answer this kind of query.
    can_text(name) says whether a collection answers text (default: can_answer_text, read each time)."""
    can_text = can_text or (lambda name: can_answer_text(session, name, checkpoint))
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
            if can_text(collection):
                return collection
        except M3DError as exc:
            raise ModelLoadError(f"{collection}: its encoder cannot be read here: {unreadable(collection, exc)}") from None
    able, unknown = [], {}
    for n in names:
        try:
            if can_text(n):
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


@dataclass
class CollectionState:
    """What a query reads about a collection before it searches, read once per generation (every
    write moves the generation, so a sync's changes are seen by the next query)."""

    name: str
    generation: str | None
    fingerprint: Fingerprint | None
    classes: dict[str, int]
    points: int
    _consensus: list = field(default_factory=list)  # [DatasetUp | None] once read: read only when needed


class Searcher:
    """Warm query machinery over one open session, shared by `m3d query` (one query, then closed) and
    `m3d serve` (many, from many threads): each collection's encoder loaded once, one renderer per view
    settings on one render thread (a GL context belongs to the thread that made it), and each
    collection's state (fingerprint, classes, up-axis consensus) kept until its generation moves.

    Store reads take the read side of the session's guard, so a query that runs while a sync writes
    sees each collection as it was before a write or after it; rendering and encoding run outside it."""

    def __init__(self, session: Session, *, checkpoint: Path | None = None, device: str | None = None,
                 max_faces: int = DEFAULT_MAX_FACES, uploads: bool = False):
        """uploads: query meshes come from other people (a server's uploads): each is read alone,
        never the files it names (meshio.load_mesh standalone)."""
        self.session = session
        self.checkpoint = checkpoint
        self.device = device
        self.max_faces = max_faces
        self.uploads = uploads
        self._lock = threading.Lock()
        self._states: dict[str, CollectionState] = {}
        self._encoders: dict[str, tuple[object, threading.Lock]] = {}
        self._text: dict[str, bool] = {}  # encoder spec -> has a text tower (config.json read once)
        self._renderers: dict = {}  # ViewSettings -> renderer, touched only on the render thread
        self._render_thread = ThreadPoolExecutor(1, thread_name_prefix="m3d-render")

    # -- per-collection state -------------------------------------------------------------------
    def state(self, name: str) -> CollectionState:
        """The collection's state now (call under the guard's read side, or with no writer about)."""
        generation = self.session.vectors.generation(name)
        held = self._states.get(name)
        if held is not None and held.generation == generation:
            return held
        fp = self.session.fingerprint(name)
        classes = self.session.vectors.facet(name, "class") if fp is not None else {}
        state = CollectionState(name, generation, fp, classes, self.session.vectors.count(name))
        self._states[name] = state
        return state

    def consensus(self, state: CollectionState) -> DatasetUp | None:
        """The up-axis consensus of a collection's objects, read once per generation (--up auto)."""
        if not state._consensus:
            state._consensus.append(collection_consensus(self.session, state.name))
        return state._consensus[0]

    def can_text(self, name: str) -> bool:
        """can_answer_text, read once per encoder (raises ModelLoadError as it does, uncached)."""
        fp = self.state(name).fingerprint
        if fp is None:
            return False
        if fp.encoder not in self._text:
            self._text[fp.encoder] = can_answer_text(self.session, name, self.checkpoint)
        return self._text[fp.encoder]

    # -- the warm parts ---------------------------------------------------------------------------
    def encoder(self, fp: Fingerprint):
        """The collection's encoder, loaded on first use, with the lock its callers encode under
        (one encode at a time per model: threads would only split the same cores)."""
        with self._lock:
            if fp.encoder not in self._encoders:
                self._encoders[fp.encoder] = (collection_encoder(self.session, fp, checkpoint=self.checkpoint,
                                                                 device=self.device), threading.Lock())
            return self._encoders[fp.encoder]

    def render(self, mesh: Mesh, fp: Fingerprint, rotation: np.ndarray) -> np.ndarray:
        """The mesh, posed by rotation, through the collection's cameras, on the render thread."""
        return self._render_thread.submit(self._render, mesh, fp, rotation).result()

    def _render(self, mesh: Mesh, fp: Fingerprint, rotation: np.ndarray) -> np.ndarray:
        renderer = self._renderers.get(fp.view)
        if renderer is None:
            renderer = self._renderers[fp.view] = create_renderer(fp.view)
        return renderer.render(posed(mesh, rotation))

    def stored_views(self, payload: dict, fp: Fingerprint) -> np.ndarray:
        """A stored object rendered as its collection saw it (its stored pose), from its dataset's
        folder on this machine; UsageError when that file is not here or changed since it was synced."""
        from .dataset import content_hash

        path = self.session.source_path(payload)
        if path is None or not path.is_file():
            raise UsageError(f"{payload.get('path')}: its file is not available on this machine")
        if payload.get("content_hash") and content_hash(path) != payload["content_hash"]:
            raise UsageError(f"{payload.get('path')}: the file changed since it was synced (run m3d sync)")
        mesh = load_named(path, self.max_faces)
        return self.render(mesh, fp, rotation_of(mesh, fp, payload.get("pose"), suffix=path.suffix))

    # -- queries ----------------------------------------------------------------------------------
    def vector(self, q: Query, fp: Fingerprint, dataset: DatasetUp | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The unit query vector in the collection's space, and the views it came from (None for text);
        a mesh is posed by the collection's rule (`dataset`: its up-axis consensus, for --up auto). For a
        views collection: (m, dim), one unit row per view shown (a text: one row)."""
        import torch

        from .pooling import MULTIVECTOR, ORDERED, pool

        if fp.pool in ORDERED and q.kind != "mesh":
            raise UsageError(f"a {fp.pool} collection matches whole rings of views, and a{'n image' if q.kind == 'image' else ' text'} "
                             f"query has none: ask the views collection (m3d sync --pools views) instead")
        views = None
        if q.kind == "mesh":  # rendered before the encoder loads: a bad mesh fails fast
            mesh = load_named(q.mesh, self.max_faces, standalone=self.uploads)
            views = self.render(mesh, fp, rotation_of(mesh, fp, dataset=dataset, suffix=q.mesh.suffix))
        elif q.kind == "image":
            views = image_view(q.image, fp.view.size)
        encoder, lock = self.encoder(fp)
        with lock:
            if q.kind == "text":
                vector = torch.nn.functional.normalize(encoder.encode_text([q.text]).float(), dim=-1).cpu().numpy()
                return (vector if fp.pool in MULTIVECTOR else vector[0]), None
            per_view = encoder.encode(views)  # an image is one view: every pool of one view is that view
            slots = fp.view.views if fp.pool in ORDERED else None  # a ring's orders need every slot
            return pool(fp.pool, per_view[None], slots).cpu().numpy()[0], views

    def search(self, q: Query, *, collection: str | None = None, k: int = 5, label: str | None = None,
               exact: bool = False, params: SearchSettings = SearchSettings()) -> QueryResult:
        """q.up names the query mesh's up axis when it does not follow the collection's rule."""
        from .encoders import is_local_id

        guard = self.session.guard
        with guard.reading():
            name = choose_collection(self.session, collection, q.kind, self.checkpoint, self.can_text)
            state = self.state(name)
            fp = state.fingerprint
            if fp is None:
                raise StoreError(f"collection {name} is empty")
            if self.checkpoint is not None and not is_local_id(fp.encoder):  # it would be ignored: say so
                raise UsageError(f"--checkpoint is for a collection synced from a local checkpoint; {name} was "
                                 f"built with {fp.model_id}, which m3d finds by itself")
            if label is not None and label not in state.classes:  # an unknown class is a typo, not "no neighbours"
                near = sorted(state.classes, key=lambda c: (c.lower() != label.lower(), c))[:5]
                raise UsageError(f"no class {label!r} in {name}; classes include: {', '.join(near)}")
            view = fp.view if q.up is None else replace(fp.view, up=q.up)
            dataset = self.consensus(state) if q.kind == "mesh" and view.up == "auto" else None
        vector, views = self.vector(q, replace(fp, view=view), dataset)
        hits, engine = self.nearest(name, fp, vector, k, label=label, exact=exact, params=params)
        return QueryResult(name, engine, hits, views, q.kind)

    def nearest(self, name: str, fp: Fingerprint, vector: np.ndarray, k: int, *, label: str | None = None,
                exact: bool = False, params: SearchSettings = SearchSettings(),
                exclude: str | None = None) -> tuple[list[Hit], str]:
        """The k nearest stored objects to a vector made with fp, from Qdrant or (exact) FAISS; exclude
        leaves one id out (an object's own "more like this")."""
        extra = exclude is not None
        while True:
            with self.session.guard.reading():
                if self.state(name).fingerprint != fp:  # rebuilt with other settings while this query ran
                    raise StoreError(f"collection {name} changed while this query ran: ask again")
                if not exact:
                    hits = self.session.vectors.search(name, vector[None], k + extra, label=label, params=params)[0]
                    return [h for h in hits if h.id != exclude][:k], "qdrant"
                index = self.session.held_exact(name)
                if index is not None:
                    return [h for h in _exact_hits(self.session, name, index, vector, k + extra, label)
                            if h.id != exclude][:k], "faiss"
            self.session.exact(name)  # load (or rebuild) it under the write side, then answer under the read side

    def close(self) -> None:
        def release() -> None:
            for renderer in self._renderers.values():
                renderer.close()
            self._renderers.clear()

        self._render_thread.submit(release).result()
        self._render_thread.shutdown()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _exact_hits(session: Session, name: str, index, vector: np.ndarray, k: int, label: str | None) -> list[Hit]:
    """FAISS's exact answer; within one class, every member scored and the best k kept."""
    if label is None:
        scores, ids = index.search(vector[None], k)
        records = {r.id: r.payload for r in session.vectors.retrieve(name, ids[0])}
        return [Hit(i, float(s), records.get(i, {})) for i, s in zip(ids[0], scores[0])]
    members = [r.id for r in session.vectors.records(name, fields=["class"]) if r.payload.get("class") == label]
    member_rows = np.array([index.row(m) for m in members if index.row(m) is not None], dtype=int)
    scores = scores_of(vector[None], index.vectors[member_rows], index.views)[0] if len(member_rows) else np.zeros(0)
    top = np.argsort(-scores, kind="stable")[:k]
    chosen = [index.ids[member_rows[t]] for t in top]
    records = {r.id: r.payload for r in session.vectors.retrieve(name, chosen)}
    return [Hit(i, float(scores[t]), records.get(i, {})) for i, t in zip(chosen, top)]


def query(session: Session, mesh_path: Path | None = None, *, image: Path | None = None, text: str | None = None,
          collection: str | None = None, k: int = 5, label: str | None = None, exact: bool = False,
          up: str | None = None, checkpoint: Path | None = None,
          params: SearchSettings = SearchSettings()) -> QueryResult:
    """One query (`m3d query`): up names the query mesh's up axis when it does not follow the
    collection's rule; checkpoint is the directory of a collection's local checkpoint when this store
    does not remember it."""
    q = Query(mesh=mesh_path, image=image, text=text, up=up)
    with Searcher(session, checkpoint=checkpoint) as searcher:
        return searcher.search(q, collection=collection, k=k, label=label, exact=exact, params=params)
