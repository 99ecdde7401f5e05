"""The store directory as a whole: the lock, the Qdrant backend, the FAISS indexes kept in step with
it, and the sync reports. Everything a command needs is opened here, once, under the lock."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .connector import VectorStore, open_store
from .connector.exact import ExactIndex, ids_digest
from .connector.lock import StoreLock
from .errors import StoreError
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

    def exact(self, name: str) -> ExactIndex:
        """The FAISS index of a collection, rebuilt from Qdrant first if it is missing or out of step."""
        index = ExactIndex.load(self.exact_dir, name)
        if index is None or index.dim != self.vectors.dim(name) or len(index.ids) != self.vectors.count(name):
            index = self.refresh_exact(name)
        return index

    def refresh_exact(self, name: str, known_ids: list[str] | None = None) -> ExactIndex:
        """Rebuild a collection's FAISS index from what Qdrant holds (skipped when the saved one
        already holds exactly known_ids)."""
        if known_ids is not None:
            saved = ExactIndex.load(self.exact_dir, name)
            if saved is not None and ids_digest(saved.ids) == ids_digest(known_ids):
                return saved
        ids, vectors = [], []
        for rec in self.vectors.records(name, fields=["class"], vectors=True):
            ids.append(rec.id)
            vectors.append(rec.vector)
        dim = self.vectors.dim(name)
        matrix = np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)
        index = ExactIndex(ids, matrix)
        index.save(self.exact_dir, name)
        return index

    def drop(self, name: str) -> None:
        self.vectors.drop_collection(name)
        ExactIndex.remove(self.exact_dir, name)

    def check(self, repair: bool = False) -> list[dict]:
        """Per collection: Qdrant count, FAISS count, whether they hold the same ids, fingerprints seen,
        and vectors that are not unit length (damage a re-run of `m3d sync` re-embeds)."""
        rows = []
        for name in self.collections():
            ids, prints, damaged = [], set(), 0
            for rec in self.vectors.records(name, fields=["pipeline"], vectors=True):
                ids.append(rec.id)
                prints.add(json.dumps(rec.payload.get("pipeline"), sort_keys=True))
                damaged += not is_unit(rec.vector)
            index = ExactIndex.load(self.exact_dir, name)
            in_step = index is not None and ids_digest(index.ids) == ids_digest(ids)
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

    def remember_root(self, dataset: str, root: Path) -> None:
        """Where a dataset's files live on this machine (kept locally, never in a shared payload),
        so figures and galleries can re-render stored objects on demand."""
        roots = self.roots()
        roots[dataset] = str(Path(root).resolve())
        self.write_report("roots.json", roots)

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


def open_session(store_dir: Path, *, url: str | None = None, api_key: str | None = None) -> Session:
    """Lock the store directory, then open its Qdrant backend (embedded unless url is given)."""
    store_dir = Path(store_dir)
    lock = StoreLock(store_dir).__enter__()
    try:
        vectors = open_store(store_dir, url=url, api_key=api_key)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return Session(store_dir, vectors, lock)
