"""`m3d check` and `m3d check --repair`: every collection read through, its FAISS file compared row by
row, the store's own files checked for the right kind; each problem named with its fix, and repair
doing what can be done without re-embedding (setting damage aside, rebuilding what is derived)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import manifest
from .connector.exact import ExactIndex
from .errors import M3DError, StoreError
from .schemas import Fingerprint

if TYPE_CHECKING:
    from .store import Session

#: The store's own files and whether each is a directory; anything else in one of these places is damage.
LAYOUT = {"qdrant": True, "faiss": True, "reports": True, manifest.FOLDER: True, "reports/last-sync.json": False,
          "reports/roots.json": False}
REBUILDS = "`m3d check --repair` rebuilds it"


def check_store(session: Session, repair: bool = False) -> list[dict]:
    """Per collection: Qdrant count, FAISS count, whether they hold the same ids, fingerprints seen,
    vectors that are not unit length (damage a re-run of `m3d sync` re-embeds) and damage to the
    store's files. With repair: set aside misplaced store files, rewrite collection settings and
    payload indexes, set aside collections whose points cannot be read, rebuild FAISS."""
    rows = []
    damage = _layout_damage(session)
    if damage:
        done = [f"set aside {_set_aside_file(session.store_dir, path)}" for path, _ in damage] if repair else []
        rows.append(_row("(store files)", problems=[why for _, why in damage], repaired=done, ok=bool(done)))
    for name in session.collections():
        rows.append(_check_collection(session, name, repair))
        if not rows[-1]["ok"]:  # whatever check found, the next sync reads every point (and vector) again
            manifest.remove(session, name)
    return rows


def _check_collection(session: Session, name: str, repair: bool) -> dict:
    vectors = session.vectors
    problems, done = [], []
    try:
        problems = vectors.problems(name)
        if repair and problems:
            done = vectors.repair(name)
            problems = vectors.problems(name)
        index, why = ExactIndex.open(session.exact_dir, name)
        why = why or session.distrust(name, index, vectors.generation(name))  # the cheap checks first
        count, prints, damaged, same = _compare(session, name, index if why is None else None)
        if why is None and not same:
            why = "holds other vectors than Qdrant"
    except StoreError as exc:  # the points themselves cannot be read: only a new sync brings them back
        if repair:
            where = vectors.set_aside(name, session.store_dir / "damaged")
            session.drop_exact(name)
            done.append(f"set aside {where}: run `m3d sync` to embed it again")
        return _row(name, problems=list(dict.fromkeys([*problems, str(exc)])), repaired=done, ok=False)
    if index is not None:
        index.close()  # check's own read of the file: the session keeps none
    if repair and why is not None:
        index = session.rebuild_exact(name)
        if _compare(session, name, index)[3]:
            done.append(f"rebuilt FAISS (it {why})")
            why = None
    if why is not None:
        problems.append(f"FAISS index of {name} {why}: {REBUILDS}")
    faiss_points = len(index) if index is not None and (why is None or not repair) else None
    return _row(name, qdrant_points=count, faiss_points=faiss_points, in_step=why is None,
                fingerprints=len(prints), damaged_vectors=damaged, problems=problems, repaired=done,
                ok=why is None and len(prints) <= 1 and damaged == 0 and not problems)


def _compare(session: Session, name: str, index: ExactIndex | None) -> tuple[int, set[str], int, bool]:
    """Every point of the collection, streamed: (count, fingerprints seen, vectors not unit length,
    whether the index holds exactly these ids, each with Qdrant's vector)."""
    from .store import is_unit

    count, written, damaged, same = 0, set(), 0, index is not None
    for rec in session.vectors.records(name, fields=["pipeline"], vectors=True):
        count += 1
        written.add(json.dumps(rec.payload.get("pipeline"), sort_keys=True))  # as written: cheap per point
        damaged += not is_unit(rec.vector)
        if same:
            row = index.row(rec.id)
            with np.errstate(over="ignore", invalid="ignore"):  # garbled floats compare unequal, quietly
                same = row is not None and np.allclose(index.vectors[row], rec.vector.ravel(), atol=1e-5, equal_nan=True)
    prints = {_settings_key(json.loads(raw)) for raw in written}  # read as settings once per spelling
    return count, prints, damaged, same and len(index) == count


def _layout_damage(session: Session) -> list[tuple[Path, str]]:
    """Store files of the wrong kind (a file where a folder belongs, or the reverse, a folder where a
    FAISS file belongs) or with unreadable content, each with its one-line description."""
    found, store = [], session.store_dir
    for rel, is_dir in LAYOUT.items():
        path = store / rel
        if (path.exists() or path.is_symlink()) and path.is_dir() != is_dir:
            found.append((path, f"{path} should be a {'directory' if is_dir else 'file'}: `m3d check --repair` "
                                "sets it aside"))
    faiss = store / "faiss"
    if faiss.is_dir() and not faiss.is_symlink():
        found += [(path, f"{path} should be a FAISS file, not a directory: `m3d check --repair` sets it aside")
                  for path in sorted(faiss.iterdir()) if path.is_dir()]
    if not found:
        try:
            session.roots()
        except StoreError as exc:
            found.append((store / "reports" / "roots.json", str(exc)))
    return found


def _set_aside_file(store: Path, path: Path) -> Path:
    """Move a damaged store file into STORE/damaged (kept, never deleted: it may hold someone's work)."""
    where = store / "damaged"
    where.mkdir(exist_ok=True)
    target, n = where / path.name, 1
    while target.exists() or target.is_symlink():
        target, n = where / f"{path.name}.{n}", n + 1
    path.rename(target)
    return target


def _row(name: str, *, qdrant_points=None, faiss_points=None, in_step=False, fingerprints=0, damaged_vectors=0,
         problems=(), repaired=(), ok=False) -> dict:
    """One line of `m3d check`: the same columns for every collection and for the store's own files."""
    return {"collection": name, "qdrant_points": qdrant_points, "faiss_points": faiss_points, "in_step": in_step,
            "fingerprints": fingerprints, "damaged_vectors": damaged_vectors, "problems": "; ".join(problems),
            "repaired": "; ".join(repaired), "ok": ok}


def _settings_key(pipeline: dict | None) -> str:
    """One key per set of settings: points written before a setting existed (or when the sphere still
    recorded an elevation) read as what they were made with, so they count with their new neighbours."""
    try:
        pipeline = Fingerprint.from_payload(pipeline).to_payload()
    except (AttributeError, KeyError, TypeError, M3DError):
        pass  # unreadable: its raw form is its own key, and check says there is more than one
    return json.dumps(pipeline, sort_keys=True)
