"""The store directory as a whole: the lock, the Qdrant backend, the FAISS indexes kept in step with
it, and the sync reports. Everything a command needs is opened here, once, under the lock."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .connector import VectorStore, open_store
from .connector.exact import ExactIndex, ids_digest
from .connector.lock import StoreLock
from .errors import StoreError, UsageError
from .schemas import COLLECTION_PREFIX, Fingerprint

log = logging.getLogger("m3d")


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
        return _own_dir(self.store_dir / "faiss")

    @property
    def reports_dir(self) -> Path:
        return _own_dir(self.store_dir / "reports")

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
        return self.store_dir / "faiss" / f"{name}.stale"  # read where it would be, even when faiss/ is damaged

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
        try:
            index.save(self.exact_dir, name)
            self._stale_marker(name).unlink(missing_ok=True)
        except OSError as exc:  # a read-only or full store still answers, from the index built in memory
            log.warning("FAISS index of %s not saved (%s); answering from memory", name, exc.strerror)
        return index

    def drop(self, name: str) -> None:
        self.vectors.drop_collection(name)
        self.drop_exact(name)

    def drop_exact(self, name: str) -> None:
        ExactIndex.remove(self.exact_dir, name)
        self._stale_marker(name).unlink(missing_ok=True)

    def check(self, repair: bool = False) -> list[dict]:
        """Per collection: Qdrant count, FAISS count, whether they hold the same ids, fingerprints seen,
        vectors that are not unit length (damage a re-run of `m3d sync` re-embeds) and damage to the
        store's files. With repair: set aside misplaced store files, rewrite collection settings and
        payload indexes, set aside collections whose points cannot be read, rebuild FAISS."""
        rows = []
        damage = self._layout_damage()
        if damage:
            done = [f"set aside {self._set_aside_file(path)}" for path, _ in damage] if repair else []
            rows.append(_row("(store files)", problems=[why for _, why in damage], repaired=done, ok=bool(done)))
        for name in self.collections():
            rows.append(self._check_collection(name, repair))
        return rows

    def _check_collection(self, name: str, repair: bool) -> dict:
        problems, done = [], []
        ids, vectors, prints, damaged = [], [], set(), 0
        try:
            problems = self.vectors.problems(name)
            if repair and problems:
                done = self.vectors.repair(name)
                problems = self.vectors.problems(name)
            for rec in self.vectors.records(name, fields=["pipeline"], vectors=True):
                ids.append(rec.id)
                vectors.append(rec.vector)
                prints.add(json.dumps(rec.payload.get("pipeline"), sort_keys=True))
                damaged += not is_unit(rec.vector)
        except StoreError as exc:  # the points themselves cannot be read: only a new sync brings them back
            if repair:
                where = self.vectors.set_aside(name, self.store_dir / "damaged")
                self.drop_exact(name)
                done.append(f"set aside {where}: run `m3d sync` to embed it again")
            return _row(name, problems=list(dict.fromkeys([*problems, str(exc)])), repaired=done, ok=False)
        index = ExactIndex.load(self.store_dir / "faiss", name)
        in_step = (not self._stale_marker(name).exists() and index is not None
                   and _same_rows(index, ids, vectors))
        if repair and not in_step:
            index = self.refresh_exact(name)
            in_step = True
            done.append("rebuilt FAISS")
        return _row(name, qdrant_points=len(ids), faiss_points=None if index is None else len(index.ids),
                    in_step=in_step, fingerprints=len(prints), damaged_vectors=damaged, problems=problems,
                    repaired=done, ok=in_step and len(prints) <= 1 and damaged == 0 and not problems)

    def _layout_damage(self) -> list[tuple[Path, str]]:
        """Store files of the wrong kind (a file where a folder belongs, or the reverse) or with
        unreadable content, each with its one-line description."""
        found = []
        for rel, is_dir in LAYOUT.items():
            path = self.store_dir / rel
            if (path.exists() or path.is_symlink()) and path.is_dir() != is_dir:
                found.append((path, f"{path} should be a {'directory' if is_dir else 'file'}"))
        if not found:
            try:
                self.roots()
            except StoreError as exc:
                found.append((self.store_dir / "reports" / "roots.json", str(exc)))
        return found

    def _set_aside_file(self, path: Path) -> Path:
        """Rename a damaged store file out of the way (kept, never deleted: it may hold someone's work)."""
        target, n = path.with_name(path.name + ".damaged"), 1
        while target.exists() or target.is_symlink():
            target, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
        path.rename(target)
        return target

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
        """The local file of a stored object, when its dataset was synced from this machine."""
        root = self.roots().get(payload.get("dataset", ""))
        return Path(root) / payload["path"] if root and payload.get("path") else None

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

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The store's own files and whether each is a directory; anything else in one of these places is damage.
LAYOUT = {"qdrant": True, "faiss": True, "reports": True, "reports/last-sync.json": False,
          "reports/roots.json": False}


def _own_dir(path: Path) -> Path:
    """A store folder, or one line saying what is in its place."""
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise StoreError(f"{path} should be a directory: `m3d check --repair` sets aside what is there")
    return path


def _row(name: str, *, qdrant_points=None, faiss_points=None, in_step=False, fingerprints=0, damaged_vectors=0,
         problems=(), repaired=(), ok=False) -> dict:
    """One line of `m3d check`: the same columns for every collection and for the store's own files."""
    return {"collection": name, "qdrant_points": qdrant_points, "faiss_points": faiss_points, "in_step": in_step,
            "fingerprints": fingerprints, "damaged_vectors": damaged_vectors, "problems": "; ".join(problems),
            "repaired": "; ".join(repaired), "ok": ok}


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
    create=False (commands that only read) refuses a folder that is not a store, so a mistyped
    --store says so instead of leaving an empty store (or a lock file) behind, and works on a store
    it cannot write (a read-only mount, a full disk)."""
    store_dir = Path(store_dir)
    if store_dir.exists() and not store_dir.is_dir():
        raise UsageError(f"--store {store_dir} is a file, not a store directory")
    if not create and url is None and not any((store_dir / part).is_dir() for part in ("qdrant", "faiss", "reports")):
        raise StoreError(f"no store at {store_dir}: run `m3d sync DIR --store {store_dir}` first, or pass --store")
    lock = StoreLock(store_dir, write=create or url is not None).__enter__()  # server mode: local FAISS
    try:
        vectors = open_store(store_dir, url=url, api_key=api_key, write=create)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return Session(store_dir, vectors, lock)
