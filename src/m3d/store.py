"""The store directory as a whole: the lock, the Qdrant backend, the FAISS indexes kept in step with
it, and the sync reports. Everything a command needs is opened here, once, under the lock."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import manifest
from .connector import VECTOR_PAGE, VectorStore, open_store, write_bytes
from .connector.exact import MISSING, ExactIndex, path_of
from .connector.guard import Guarded, ReadWriteLock
from .connector.lock import StoreLock
from .errors import StoreError, UsageError
from .schemas import COLLECTION_PREFIX, Fingerprint

log = logging.getLogger("m3d")

#: Rows of a saved FAISS index compared with Qdrant's vectors each time it is opened (a cheap guard
#: against a writer that bypasses m3d; `m3d check` compares every row).
SPOT_CHECK = 16


def is_unit(vector: np.ndarray | None, tol: float = 1e-3) -> bool:
    """Stored vectors are L2-normalised (each view of a multivector): a zero or non-finite one means
    damage, not data."""
    if vector is None or not np.size(vector):
        return False
    with np.errstate(over="ignore", invalid="ignore"):  # garbled floats: damage to count, not a warning to print
        norms = np.linalg.norm(np.atleast_2d(vector), axis=-1)
    return bool(np.all(np.isfinite(norms)) and np.all(np.abs(norms - 1.0) <= tol))


def _writes(method):
    """A Session method that changes the store or its FAISS files: it runs under the write side of
    the session's guard, whole (reentrant: writes inside it do not wait on themselves)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self.guard.writing():
            return method(self, *args, **kwargs)
    return guarded


@dataclass
class Session:
    """An open store: use as a context manager so the lock and the engine are released."""

    store_dir: Path
    vectors: VectorStore
    lock: StoreLock
    _exact: dict[str, ExactIndex] = field(default_factory=dict)  # in step with this session's writes
    _written: dict[str, str] = field(default_factory=dict)  # collection -> generation this session wrote last
    created: bool = False  # this session made the directory: a refused command leaves none behind
    #: readers (a serving process's queries) take its read side; every write here takes the write side,
    #: so a query sees a collection before or after a write (generation, Qdrant rows, FAISS rows), never between
    guard: ReadWriteLock = field(default_factory=ReadWriteLock)

    @property
    def exact_dir(self) -> Path:
        return _own_dir(self.store_dir / "faiss")

    @property
    def reports_dir(self) -> Path:
        return _own_dir(self.store_dir / "reports")

    def collections(self) -> list[str]:
        return [c for c in self.vectors.collections() if c.startswith(COLLECTION_PREFIX + "_")]

    def require(self, name: str) -> None:
        """A collection the user named (--collection): a name that is not there is a usage error (exit 2)."""
        if name not in self.collections():
            known = ", ".join(self.collections()) or "none (run m3d sync first)"
            raise UsageError(f"no collection {name!r} in {self.vectors.location}; collections: {known}")

    def fingerprint(self, name: str) -> Fingerprint | None:
        """The pipeline settings that produced a collection (read from one of its points)."""
        for rec in self.vectors.records(name, fields=["pipeline"]):
            return Fingerprint.from_payload(rec.payload["pipeline"])
        return None

    # -- FAISS, kept in step with Qdrant ---------------------------------------------------
    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        """Write points to Qdrant and the same rows to the collection's FAISS index (a multivector
        collection's (n, views, dim) as flat rows)."""
        with self.guard.writing():
            index = self.exact(name)
            # before the generation moves: a write refused for space leaves FAISS describing the collection
            self.vectors.require_space(write_bytes(len(ids), np.asarray(vectors).size * 4) + index.growth_bytes(len(ids)))
            token = self._advance(name)
            self.vectors.upsert(name, ids, vectors, payloads)
            index.upsert(ids, vectors)
            index.generation = token

    def delete(self, name: str, ids: list[str]) -> None:
        """Delete points from Qdrant and their rows from FAISS."""
        if not ids:
            return
        with self.guard.writing():
            index = self.exact(name)
            self.vectors.require_space(write_bytes(len(ids), 0))
            token = self._advance(name)
            self.vectors.delete(name, ids)
            index.remove(ids)
            index.generation = token

    def _advance(self, name: str) -> str:
        """A new generation, stored in the collection before it changes: from now on no FAISS file,
        here or on another machine, describes it until one is saved with this token."""
        token = uuid.uuid4().hex
        self.vectors.set_generation(name, token)
        self._written[name] = token
        return token

    @_writes
    def finish(self, name: str) -> float:
        """After a sync's writes: build the collection's HNSW graph and quantized vectors where its
        settings call for them (the embedded engine has no background optimiser), then save FAISS.
        Returns the seconds the index build took."""
        start = time.perf_counter()
        if self.vectors.optimize(name):
            log.info("indexed %s in %.1f s: %s", name, time.perf_counter() - start, self.vectors.index_info(name).state)
        seconds = time.perf_counter() - start
        self.save_exact(name)
        return seconds

    @_writes
    def save_exact(self, name: str) -> ExactIndex:
        """Commit the index kept in step by this session's writes (its rows are already in its file).
        If another writer changed the collection meanwhile (its generation is not the one this
        session wrote last), the rows kept here miss its changes: rebuild from Qdrant instead."""
        if name not in self._written:  # nothing written here: check (and if need be rebuild) what is saved
            return self.exact(name)
        index = self._exact[name]
        if self.vectors.generation(name) != self._written[name]:
            log.warning("collection %s was changed by another writer during this one: FAISS rebuilt from Qdrant", name)
            return self.rebuild_exact(name)
        index.commit(self._written[name])
        log.info("faiss index of %s holds %d points", name, len(index))
        return index

    def held_exact(self, name: str) -> ExactIndex | None:
        """The FAISS index this session holds for a collection when it still describes it (loaded and
        kept in step since), else None: a reader's check that changes nothing (exact() may rebuild)."""
        held = self._exact.get(name)
        return held if held is not None and held.generation == self.vectors.generation(name) else None

    @_writes
    def exact(self, name: str) -> ExactIndex:
        """The FAISS index of a collection, provably describing what Qdrant holds now: its saved
        generation is the collection's, its collection and dimension match, its row count matches
        Qdrant's and sampled rows equal Qdrant's vectors. Otherwise it is rebuilt from Qdrant (one
        warning line says why), so FAISS never answers from other vectors."""
        current = self.vectors.generation(name)
        held = self._exact.get(name)  # loaded or built by this session and kept in step since
        if held is not None and held.generation == current:
            return held
        index, unreadable = ExactIndex.open(self.exact_dir, name)
        reason = unreadable or self.distrust(name, index, current)
        if reason is None:
            self._exact[name] = index
            return index
        if index is not None:
            index.close()
        # a missing file is routine (a new collection); anything else means it was out of step
        (log.info if unreadable == MISSING else log.warning)("FAISS index of %s %s: rebuilt from Qdrant", name, reason)
        return self.rebuild_exact(name, must_save=False)

    def distrust(self, name: str, index: ExactIndex, current: str | None) -> str | None:
        """Why a saved index may not answer for the collection now, or None when it may."""
        if index.collection != self.vectors.physical(name):
            return f"was made for collection {index.collection or '(unknown)'}"
        if current is None or index.generation != current:
            return "describes another generation of the collection (written since, or restored from elsewhere)"
        if (index.dim, index.views) != self._row_shape(name) or len(index) != self.vectors.count(name):
            return "holds other rows than Qdrant"
        rows = {index.id_at(r): r for r in np.linspace(0, len(index) - 1, num=min(SPOT_CHECK, len(index)), dtype=int)}
        records = self.vectors.retrieve(name, list(rows), vectors=True) if rows else []
        if len(records) != len(rows):  # a sampled id Qdrant does not hold (retrieve skips it silently)
            return "holds other ids than Qdrant"
        with np.errstate(over="ignore", invalid="ignore"):  # a garbled float is a difference, not a warning
            for rec in records:
                if not np.allclose(index.vectors[rows[rec.id]], rec.vector.ravel(), atol=1e-5, equal_nan=True):
                    return "holds other vectors than Qdrant"
        return None

    @_writes
    def rebuild_exact(self, name: str, *, must_save: bool = True) -> ExactIndex:
        """Build a collection's FAISS index from every vector Qdrant holds, streamed page by page into
        a new file that then replaces the saved one (a command that only reads builds it in a
        temporary file when the store cannot be written). The generation is read before the scroll:
        a write during it advances the token, so the result never passes as current. A collection
        without one (never written by this m3d) gets its token at its next write; until then a saved
        index of it is never trusted."""
        token = self.vectors.generation(name)
        if token is None and must_save:
            token = self._advance(name)
        index = None
        dim, views = self._row_shape(name)
        try:
            index = self._fill(name, ExactIndex.build(self.exact_dir, name, dim, self.vectors.physical(name), views))
            index.commit(token)
            index.move_to(self.exact_dir, name)
        except OSError as exc:
            if index is not None:  # filled but not saved (commit or move failed): no .tmp left behind
                index.discard()
            target = path_of(self.exact_dir, name)
            why = f"{target} is a directory: `m3d check --repair` sets it aside" if target.is_dir() \
                else exc.strerror or exc
            if must_save:
                if target.is_dir():
                    raise StoreError(f"FAISS index of {name} not saved ({why})") from None
                raise
            log.warning("FAISS index of %s not saved (%s): it answers from a temporary file for this command", name, why)
            index = self._fill(name, ExactIndex([], np.zeros((0, dim), np.float32),
                                                collection=self.vectors.physical(name), views=views))
        index.generation = token
        self._exact[name] = index
        log.info("faiss index of %s holds %d points", name, len(index))
        return index

    def _row_shape(self, name: str) -> tuple[int, int]:
        """(dims, views) of a collection's FAISS rows: a multivector point is one row of views x dim."""
        views = self.vectors.views(name) or 1
        return self.vectors.dim(name) * views, views

    def _fill(self, name: str, index: ExactIndex) -> ExactIndex:
        """Every vector of the collection into an empty index, one scroll page at a time."""
        try:
            ids, rows = [], []
            for rec in self.vectors.records(name, fields=["class"], vectors=True):
                ids.append(rec.id)
                rows.append(rec.vector)
                if len(ids) == VECTOR_PAGE:  # one scroll page held, never the matrix
                    index.upsert(ids, np.stack(rows))
                    ids, rows = [], []
            index.upsert(ids, np.stack(rows) if rows else np.zeros((0, index.dim), np.float32))
            return index
        except BaseException:
            index.discard()
            raise

    @_writes
    def publish(self, name: str, version: str) -> None:
        """End a zero-downtime rebuild (after finish(version)): readers of `name` move to the complete
        `version` at once; its FAISS index, saved under the version's name, moves with it."""
        self.vectors.publish(name, version)
        index = self._exact.pop(version)
        index.move_to(self.exact_dir, name)
        self._exact[name] = index
        self._written.pop(name, None)
        if version in self._written:
            self._written[name] = self._written.pop(version)

    @_writes
    def drop(self, name: str) -> None:
        self.vectors.drop_collection(name)
        self.drop_exact(name)
        manifest.remove(self, name)

    @_writes
    def drop_exact(self, name: str) -> None:
        held = self._exact.pop(name, None)
        if held is not None:
            held.close()
        ExactIndex.remove_file(self.exact_dir, name)
        self._written.pop(name, None)

    def check(self, repair: bool = False) -> list[dict]:
        """`m3d check` (and with repair, `--repair`) of this store: see m3d.check."""
        from .check import check_store

        return check_store(self, repair)

    def claim_root(self, dataset: str, root: Path, *, explicit: bool = False) -> str | None:
        """Record where a dataset's files live on this machine (kept locally, never in a shared
        payload; figures re-render stored objects from there). A second folder under a name the store
        already holds would replace that dataset's objects, so it is refused while the first folder
        still exists; when it is gone (a move), or the user named the dataset with --dataset, the new
        place is recorded. Returns the previous folder when the dataset moved."""
        roots = self.roots()
        old, new = roots.get(dataset), str(root)
        if old is not None and old != new and not explicit and Path(old).is_dir() and not _same_dir(old, new):
            raise UsageError(f"dataset {dataset!r} is stored from {old}; {new} is another folder with that name: "
                             "pass --dataset NAME to store it beside")
        if old != new:
            roots[dataset] = new
            self.write_report("roots.json", roots)
        return old if old is not None and old != new else None

    def roots(self) -> dict[str, str]:
        """dataset -> folder on this machine ({} before the first sync); damage is named, never guessed."""
        path = self.store_dir / "reports" / "roots.json"
        try:
            roots = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} cannot be read ({type(exc).__name__}): `m3d check --repair` sets it aside") from None
        if not isinstance(roots, dict) or not all(isinstance(v, str) for v in roots.values()):
            raise StoreError(f"{path} is damaged (a {type(roots).__name__}, not dataset -> folder): "
                             "`m3d check --repair` sets it aside")
        return roots

    def source_path(self, payload: dict) -> Path | None:
        """The local file of a stored object, when its dataset was synced from this machine; None
        for a stored path that would lead outside its dataset's folder (absolute, or up through
        `..`): a payload is data, and no reader follows it out of the dataset roots."""
        root = self.roots().get(payload.get("dataset", ""))
        rel = payload.get("path")
        if not root or not isinstance(rel, str) or not rel:
            return None
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or "\0" in rel:
            return None
        return Path(root) / rel

    def remember_checkpoint(self, model_id: str, directory: str) -> None:
        """Where a local checkpoint (stored in payloads only as ``local:<name>@sha256:<digest>``) lives
        on this machine, so query and reports can load its encoder again; like roots, kept locally."""
        known = self.checkpoints()
        if known.get(model_id) != directory:
            known[model_id] = directory
            self.write_report("checkpoints.json", known)

    def checkpoints(self) -> dict[str, str]:
        try:
            known = json.loads((self.reports_dir / "checkpoints.json").read_text())
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def write_report(self, name: str, report: dict) -> Path:
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        path = self.reports_dir / name
        if path.is_dir():
            raise StoreError(f"{path} should be a file but is a directory: `m3d check --repair` sets it aside")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(path)
        return path

    def close(self) -> None:
        try:
            self.vectors.close()
        finally:
            self.lock.__exit__(None, None, None)
            if self.created and [p.name for p in self.store_dir.iterdir()] == ["lock"]:
                self.lock.path.unlink()
                self.store_dir.rmdir()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _own_dir(path: Path) -> Path:
    """A store folder, or one line saying what is in its place."""
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise StoreError(f"{path} should be a directory: `m3d check --repair` sets aside what is there")
    return path


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def open_session(store_dir: Path, *, url: str | None = None, api_key: str | None = None,
                 create: bool = True) -> Session:
    """Lock the store directory, then open its Qdrant backend (embedded unless url is given).
    create=False (commands that only read) refuses a folder that is not a store, so a mistyped
    --store says so instead of leaving an empty store (or a lock file) behind, and works on a store
    it cannot write (a read-only mount, a full disk)."""
    store_dir = Path(store_dir)
    if store_dir.exists() and not store_dir.is_dir():
        raise UsageError(f"--store {store_dir} is a file, not a store directory")
    if not create and url is None and not any((store_dir / part).is_dir() for part in ("qdrant", "faiss", "reports")):
        raise StoreError(f"no store at {store_dir}: run `m3d sync DIR --store {store_dir}` first, or pass --store")
    created = not store_dir.exists()
    lock = StoreLock(store_dir, write=create or url is not None).__enter__()  # server mode: local FAISS
    try:
        vectors = open_store(store_dir, url=url, api_key=api_key, write=create)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    guard = ReadWriteLock()
    return Session(store_dir, Guarded(vectors, guard), lock, created=created, guard=guard)
