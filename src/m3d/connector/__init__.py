"""Stores behind one small protocol: embedded Qdrant (qdrant-edge), a Qdrant server, and FAISS.

Qdrant is the source of truth for every collection; the FAISS flat index beside it is derived from it
(rebuilt from Qdrant after each sync), so the two can never disagree for long and `m3d check --repair`
can always bring FAISS back in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np


@dataclass
class Record:
    """A stored point as read back: id, payload, and the vector when asked for."""

    id: str
    payload: dict
    vector: np.ndarray | None = None


@dataclass
class Hit:
    id: str
    score: float
    payload: dict


class VectorStore(Protocol):
    """What the pipeline, query and eval need from a Qdrant backend."""

    location: str  # where it lives, for `m3d info` (never includes credentials)

    def collections(self) -> list[str]: ...

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create (cosine, keyword indexes on class/split/dataset) unless it exists with this dim."""

    def drop_collection(self, name: str) -> None: ...

    def dim(self, name: str) -> int: ...

    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None: ...

    def delete(self, name: str, ids: list[str]) -> None: ...

    def require_space(self, need: int = 0) -> None:
        """Raise StoreError (one line, with the MB free) unless a write of need bytes fits with room to spare."""

    def set_payload(self, name: str, payloads: dict[str, dict]) -> None:
        """Merge these keys into each point's payload (id -> keys); vectors are untouched."""

    def count(self, name: str) -> int: ...

    def records(self, name: str, *, fields: list[str] | None = None, vectors: bool = False) -> Iterator[Record]:
        """Every point (payload restricted to `fields` when given), in pages."""

    def retrieve(self, name: str, ids: list[str]) -> list[Record]: ...

    def search(self, name: str, queries: np.ndarray, k: int, *, label: str | None = None) -> list[list[Hit]]:
        """k nearest points for each query row (cosine), optionally only of one class."""

    def facet(self, name: str, key: str) -> dict[str, int]:
        """Value -> count of a keyword payload field."""

    def flush(self) -> None:
        """Make every acknowledged write durable."""

    def problems(self, name: str) -> list[str]:
        """Damage to a collection's settings or payload indexes that `repair` fixes (one line each)."""

    def repair(self, name: str) -> list[str]:
        """Fix what `problems` found; returns what was done."""

    def set_aside(self, name: str, where: Path) -> Path:
        """Move a collection whose points cannot be read out of the store (a sync then rebuilds it)."""

    def close(self) -> None: ...


def open_store(store_dir: Path, *, url: str | None = None, api_key: str | None = None,
               write: bool = True) -> VectorStore:
    """The embedded store under store_dir, or the Qdrant server at url when one is given. write=False
    (commands that only read) lets the embedded store answer from a disk it cannot write."""
    if url:
        from .server import ServerStore

        return ServerStore(url, api_key=api_key)
    from .edge import EdgeStore

    return EdgeStore(store_dir / "qdrant", write=write)
