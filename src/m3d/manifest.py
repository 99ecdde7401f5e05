"""The sync manifest: per collection, what the plan reads of each point (fresh or not, dataset, content
hash, file stamp, pose), written after every sync so that an unchanged re-sync stats the files and reads
one file per collection instead of scrolling every payload and vector.

Qdrant stays the record of finished work. A manifest is used only while it provably describes the
collection as it is now: the same physical collection, the same generation token (m3d moves it before
every write, from any machine), the same signature of the collection's files (moved by any write,
truncation or other damage on disk, whoever made it: see VectorStore.signature), the same point count,
and the same pipeline fingerprint. Anything else (a crash mid-sync, a server store, a damaged or missing
file) reads as no manifest, and the plan scrolls the collection as before, checking every vector.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Session

log = logging.getLogger("m3d")

FORMAT = 1
FOLDER = "sync"  # under the store directory, one <collection>.json each


def path(session: Session, name: str) -> Path:
    return session.store_dir / FOLDER / f"{name}.json"


def state(session: Session, name: str) -> dict:
    """What a manifest of `name` must match to be used: read from the store now (cheap: a few stats)."""
    vectors = session.vectors
    return {"format": FORMAT, "collection": vectors.physical(name), "generation": vectors.generation(name),
            "signature": vectors.signature(name), "count": vectors.count(name)}


def read(session: Session, name: str, pipeline: dict) -> dict[str, list] | None:
    """point id -> its row, as the last sync saved it, or None when no manifest vouches for the
    collection as it is now (the caller then reads the points themselves)."""
    try:
        saved = json.loads(path(session, name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("pipeline") != pipeline:
        return None
    now = state(session, name)
    if now["signature"] is None or now["generation"] is None or any(saved.get(k) != v for k, v in now.items()):
        log.info("sync manifest of %s is stale: reading its points", name)
        return None
    points = saved.get("points")
    return points if isinstance(points, dict) and len(points) == now["count"] else None


def write(session: Session, name: str, pipeline: dict, points: dict[str, list]) -> None:
    """Save the rows of a collection after its writes are flushed (so the signature is final). A store
    that cannot take the file (full disk, read-only) only loses the shortcut: one warning."""
    now = state(session, name)
    target = path(session, name)
    if now["signature"] is None or now["generation"] is None or now["count"] != len(points):
        remove(session, name)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps({**now, "pipeline": pipeline, "points": points}, separators=(",", ":")))
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("sync manifest of %s not saved (%s): the next sync reads its points", name, exc.strerror or exc)
        remove(session, name)


def remove(session: Session, name: str) -> None:
    """Forget a collection's manifest (after `m3d check` found damage the next sync must repair)."""
    try:
        path(session, name).unlink()
    except OSError:
        pass
