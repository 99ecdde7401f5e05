"""The store directory as a whole: the lock, the Qdrant backend, the FAISS indexes kept in step with
it, and the sync reports. Everything a command needs is opened here, once, under the lock."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .connector import VectorStore, open_store
from .connector.exact import ExactIndex, ids_digest
from .connector.lock import StoreLock
from .errors import StoreError, UsageError
from .schemas import COLLECTION_PREFIX, Fingerprint


def is_unit(vector: np.ndarray | None, tol: float = 1e-3) -> bool:
    """Stored vectors are L2-normalised: a zero or non-finite one means damage, not data."""
    if vector is None:
        return False
    norm = float(np.linalg.norm(vector))
    return np.isfinite(norm) and abs(norm - 1.0) <= tol


@dataclass
class Session:
    """An open store: use as a context manager so the lock and the engine are released."""

    store_dir: Path
    vectors: VectorStore
    lock: StoreLock

    @property
    def exact_dir(self) -> Path:
        return self.store_dir / "faiss"

    @property
    def reports_dir(self) -> Path:
        return self.store_dir / "reports"

    def collections(self) -> list[str]:
        return [c for c in self.vectors.collections() if c.startswith(COLLECTION_PREFIX + "_")]

    def require(self, name: str) -> None:
        if name not in self.collections():
            known = ", ".join(self.collections()) or "none (run m3d sync first)"
            raise StoreError(f"no collection {name!r} in {self.vectors.location}; collections: {known}")

    def fingerprint(self, name: str) -> Fingerprint | None:
        """The pipeline settings that produced a collection (read from one of its points)."""
        for rec in self.vectors.records(name, fields=["pipeline"]):
            return Fingerprint.from_payload(rec.payload["pipeline"])
        return None

    def _stale_marker(self, name: str) -> Path:
        return self.exact_dir / f"{name}.stale"

    def mark_stale(self, name: str) -> None:
        """Say, durably and before Qdrant changes, that the FAISS index no longer describes it: a
        crash between the Qdrant writes and the rebuild then cannot leave old vectors looking current."""
        marker = self._stale_marker(name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as handle:
            os.fsync(handle.fileno())

    def exact(self, name: str) -> ExactIndex:
        """The FAISS index of a collection, rebuilt from Qdrant first if it is missing or stale."""
        index = ExactIndex.load(self.exact_dir, name)
        if index is None or self._stale_marker(name).exists() or index.dim != self.vectors.dim(name) \
                or len(index.ids) != self.vectors.count(name):
            index = self.refresh_exact(name)
        return index

    def refresh_exact(self, name: str, known_ids: list[str] | None = None) -> ExactIndex:
        """Rebuild a collection's FAISS index from what Qdrant holds (skipped when the saved one is not
        marked stale and already holds exactly known_ids)."""
        if known_ids is not None and not self._stale_marker(name).exists():
            saved = ExactIndex.load(self.exact_dir, name)
            if saved is not None and ids_digest(saved.ids) == ids_digest(known_ids):
                return saved
        matrix = np.empty((self.vectors.count(name), self.vectors.dim(name)), np.float32)  # no list + stacked copy
        ids = []
        for row, rec in enumerate(self.vectors.records(name, fields=["class"], vectors=True)):
            ids.append(rec.id)
            matrix[row] = rec.vector
        index = ExactIndex(ids, matrix[: len(ids)])
        index.save(self.exact_dir, name)
        self._stale_marker(name).unlink(missing_ok=True)
        return index

    def drop(self, name: str) -> None:
        self.vectors.drop_collection(name)
        ExactIndex.remove(self.exact_dir, name)
        self._stale_marker(name).unlink(missing_ok=True)

    def check(self, repair: bool = False) -> list[dict]:
        """Per collection: Qdrant count, FAISS count, whether they hold the same ids, fingerprints seen,
        and vectors that are not unit length (damage a re-run of `m3d sync` re-embeds)."""
        rows = []
        for name in self.collections():
            ids, vectors, prints, damaged = [], [], set(), 0
            for rec in self.vectors.records(name, fields=["pipeline"], vectors=True):
                ids.append(rec.id)
                vectors.append(rec.vector)
                prints.add(json.dumps(rec.payload.get("pipeline"), sort_keys=True))
                damaged += not is_unit(rec.vector)
            index = ExactIndex.load(self.exact_dir, name)
            in_step = (not self._stale_marker(name).exists() and index is not None
                       and _same_rows(index, ids, vectors))
            repaired = False
            if repair and not in_step:
                index = self.refresh_exact(name)
                in_step, repaired = True, True
            rows.append({
                "collection": name,
                "qdrant_points": len(ids),
                "faiss_points": None if index is None else len(index.ids),
                "in_step": in_step,
                "repaired": repaired,
                "fingerprints": len(prints),
                "damaged_vectors": damaged,
                "ok": in_step and len(prints) <= 1 and damaged == 0,
            })
        return rows

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
        try:
            return json.loads((self.reports_dir / "roots.json").read_text())
        except (OSError, ValueError):
            return {}

    def source_path(self, payload: dict) -> Path | None:
        """The local file of a stored object, when its dataset was synced from this machine."""
        root = self.roots().get(payload.get("dataset", ""))
        return Path(root) / payload["path"] if root and payload.get("path") else None

    def write_report(self, name: str, report: dict) -> Path:
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        path = self.reports_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(path)
        return path

    def close(self) -> None:
        try:
            self.vectors.close()
        finally:
            self.lock.__exit__(None, None, None)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _same_rows(index: ExactIndex, ids: list[str], vectors: list[np.ndarray]) -> bool:
    """FAISS holds exactly these ids, each with the same vector as Qdrant."""
    if ids_digest(index.ids) != ids_digest(ids):
        return False
    row_of = {pid: row for row, pid in enumerate(index.ids)}
    return all(np.allclose(index.vectors[row_of[pid]], vec, atol=1e-5) for pid, vec in zip(ids, vectors))


def open_session(store_dir: Path, *, url: str | None = None, api_key: str | None = None,
                 create: bool = True) -> Session:
    """Lock the store directory, then open its Qdrant backend (embedded unless url is given).
    create=False (commands that only read) refuses a store directory that does not exist yet, so a
    mistyped --store says so instead of leaving an empty store behind."""
    store_dir = Path(store_dir)
    if not create and url is None and not store_dir.is_dir():
        raise StoreError(f"no store at {store_dir}: run `m3d sync DIR --store {store_dir}` first, or pass --store")
    lock = StoreLock(store_dir).__enter__()
    try:
        vectors = open_store(store_dir, url=url, api_key=api_key)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return Session(store_dir, vectors, lock)
