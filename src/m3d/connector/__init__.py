"""Stores behind one small protocol: embedded Qdrant (qdrant-edge), a Qdrant server, and FAISS.

Qdrant is the source of truth for every collection; the FAISS flat index beside it is derived from it
and kept in step write by write. Each collection carries a generation token (in the collection itself,
so a write from another machine moves it too) that tells FAISS whether it still describes Qdrant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from ..errors import UsageError

QUANTIZATIONS = ("none", "int8", "binary")
#: Points per scroll page: payloads only, and with vectors (a vector arrives as a Python list, ~32 bytes a
#: dimension: 1,024 hog points would be 57 MB, so a scan's memory is this page, not the collection).
PAGE, VECTOR_PAGE = 1024, 128
VERSION = "--v"  # a collection's versions are <name>--v<N> (name slugs never contain '-'); readers use <name>


@dataclass(frozen=True)
class IndexSettings:
    """How a collection is indexed and laid out, fixed when it is created. None = not asked for:
    a new collection takes the default, an existing one keeps what it has."""

    hnsw_m: int | None = None  # HNSW edges per node
    hnsw_ef_construct: int | None = None  # candidates while building the graph
    index_threshold: int | None = None  # build HNSW once a segment holds this many points; 0 = always
    quantization: str | None = None  # none | int8 (scalar) | binary, rescored from the original vectors
    on_disk: bool | None = None  # original vectors memory-mapped from disk instead of held in RAM
    shards: int | None = None  # server only: fixed at creation; make it a multiple of the node count
    replication_factor: int | None = None  # server only
    write_consistency: int | None = None  # server only: replicas that must acknowledge a write

    def __post_init__(self) -> None:
        for name, low in (("hnsw_m", 2), ("hnsw_ef_construct", 4), ("index_threshold", 0), ("shards", 1),
                          ("replication_factor", 1), ("write_consistency", 1)):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < low):
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise UsageError(f"unknown quantization {self.quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
        if self.write_consistency is not None and self.write_consistency > (self.replication_factor or 1):
            raise UsageError(f"--write-consistency {self.write_consistency} is more than the "
                             f"{self.replication_factor or 1} replicas of --replication-factor")

    def check_backend(self, server: bool) -> None:
        """Layout options only a server has: a one-line usage error on the embedded store."""
        if server:
            return
        asked = [f"--{name.replace('_', '-')}" for name, plain in
                 (("shards", 1), ("replication_factor", 1), ("write_consistency", 1))
                 if getattr(self, name) not in (None, plain)]
        if asked:
            raise UsageError(f"{', '.join(asked)} {'needs' if len(asked) == 1 else 'need'} a Qdrant server (--qdrant-url): the embedded store keeps "
                             "one shard per collection")

    def resolved(self) -> "IndexSettings":
        """Every field given: the asked-for values over the defaults."""
        given = {k: v for k, v in asdict(self).items() if v is not None}
        return replace(DEFAULT_INDEX, **given)

    def differences(self, stored: "IndexSettings") -> list[str]:
        """`field: stored -> asked` for each asked-for value the stored collection does not have."""
        return [f"{f.name}: {getattr(stored, f.name)!r} -> {getattr(self, f.name)!r}" for f in fields(self)
                if getattr(self, f.name) is not None and getattr(self, f.name) != getattr(stored, f.name)]

    def threshold_kb(self, dim: int) -> int:
        """The index threshold in the engines' unit (KB of vectors). 0 points means always: 1 KB, since
        Qdrant reads an indexing threshold of 0 as 'never'."""
        return max(1, -(-int(self.index_threshold) * dim * 4 // 1024))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "IndexSettings":
        """Stored settings; fields an older store did not record take the defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known}).resolved()


DEFAULT_INDEX = IndexSettings(hnsw_m=16, hnsw_ef_construct=100, index_threshold=10_000, quantization="none",
                              on_disk=False, shards=1, replication_factor=1, write_consistency=1)


def write_bytes(points: int, vector_bytes: int) -> int:
    """Disk a write of points may take: their vectors in the segment and in the WAL, each point's
    payload, id tracker and WAL entry (4 KB, generously)."""
    return 2 * (vector_bytes + points * 4096)


@dataclass(frozen=True)
class SearchSettings:
    """Search-time settings: they change how Qdrant answers, never what it holds."""

    hnsw_ef: int | None = None  # candidates kept while walking the graph (None: the engine's default)
    rescore: bool = True  # re-rank quantized candidates with the original vectors
    # quantized candidates fetched per result and rescored: without it rescoring only re-ranks the k the
    # quantized search found (measured: int8 recall@10 stays 0.963 at any ef; 2x oversampling: 1.0)
    oversampling: float | None = 2.0

    def __post_init__(self) -> None:
        if self.hnsw_ef is not None and (int(self.hnsw_ef) != self.hnsw_ef or self.hnsw_ef < 1):
            raise UsageError(f"--hnsw-ef must be a positive integer, got {self.hnsw_ef!r}")
        if self.oversampling is not None and not self.oversampling >= 1.0:
            raise UsageError(f"--oversampling must be >= 1, got {self.oversampling!r}")


@dataclass
class IndexInfo:
    """What `m3d info` and eval show about a collection's index."""

    settings: IndexSettings
    points: int
    indexed: int  # vectors in an HNSW graph (0: every search is a full scan)

    @property
    def state(self) -> str:
        if not self.indexed:
            return "none (exact scan)"
        part = "" if self.indexed >= self.points else f" ({self.indexed}/{self.points} points)"
        quant = "" if self.settings.quantization == "none" else f" {self.settings.quantization}"
        return f"hnsw m={self.settings.hnsw_m} ef_construct={self.settings.hnsw_ef_construct}{quant}{part}"


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

    def ensure_collection(self, name: str, dim: int, settings: IndexSettings = IndexSettings(),
                          views: int | None = None) -> None:
        """Create (cosine, keyword indexes on class/split/dataset before any point, index settings)
        unless it exists with this dim; an existing one with other asked-for settings is refused.
        views: a multivector collection (Qdrant's MaxSim comparator) whose points hold that many
        vectors of dim each; None: one plain vector per point."""

    def index_info(self, name: str) -> IndexInfo: ...

    def optimize(self, name: str) -> bool:
        """Build what the settings call for (HNSW graph, quantized vectors) now; True if anything was
        built. A server does this in the background: there it only reports whether it is done."""

    def drop_collection(self, name: str) -> None:
        """The collection, its current version and its alias."""

    def physical(self, name: str) -> str:
        """The collection (version) a name reads from now: its alias target, or the name itself."""

    def begin_rebuild(self, name: str) -> str:
        """The name of a fresh version to fill while readers keep using `name` (zero-downtime rebuild)."""

    def publish(self, name: str, version: str) -> None:
        """Make `name` read from the complete `version` at once, then drop the version it read before."""

    def dim(self, name: str) -> int:
        """Dimensions of one vector (of one view, in a multivector collection)."""

    def views(self, name: str) -> int | None:
        """Vectors per point of a multivector collection; None for plain vectors."""

    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        """vectors: (n, dim), or (n, views, dim) in a multivector collection."""

    def delete(self, name: str, ids: list[str]) -> None: ...

    def require_space(self, need: int = 0) -> None:
        """Raise StoreError (one line, with the MB free) unless a write of need bytes fits with room to spare."""

    def set_payload(self, name: str, payloads: dict[str, dict]) -> None:
        """Merge these keys into each point's payload (id -> keys); vectors are untouched."""

    def count(self, name: str) -> int: ...

    def records(self, name: str, *, fields: list[str] | None = None, vectors: bool = False) -> Iterator[Record]:
        """Every point (payload restricted to `fields` when given), in pages; a multivector point's
        vector is its (views, dim) matrix."""

    def retrieve(self, name: str, ids: list[str], *, vectors: bool = False) -> list[Record]:
        """The points of these ids that exist, in the order asked."""

    def generation(self, name: str) -> str | None:
        """The collection's generation token (None when no m3d write ever set one)."""

    def set_generation(self, name: str, token: str) -> None:
        """Store a new generation token in the collection, durably, before the collection changes."""

    def metadata(self, name: str, key: str) -> object | None:
        """A JSON value m3d keeps with the collection itself (its up rules), None when none is stored:
        read without touching a point, so it costs the same at any size."""

    def set_metadata(self, name: str, key: str, value: object) -> None:
        """Replace that value (every machine using the collection sees it)."""

    def signature(self, name: str) -> str | None:
        """What the collection's files look like on disk now (moved by any write or damage, whoever made
        it), or None where the backend cannot say: with the generation, what a sync manifest is checked by."""

    def search(self, name: str, queries: np.ndarray, k: int, *, label: str | None = None,
               params: SearchSettings = SearchSettings()) -> list[list[Hit]]:
        """k nearest points for each query row (cosine), optionally only of one class. Queries of a
        multivector collection are (q, m, dim): scored by MaxSim, shown divided by m (multi_score)."""

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


def shape_text(dim: int, views: int | None) -> str:
    """A collection's vectors in words: `512-d`, or `12 x 1764-d` for a multivector collection."""
    return f"{dim}-d" if views is None else f"{views} x {dim}-d"


def multi_score(score: float, queries: np.ndarray) -> float:
    """Qdrant's MaxSim score is a sum over the query's vectors: shown as their mean (in [-1, 1], like a
    cosine), so one threshold reads the same for a one-view image query and a twelve-view mesh."""
    return score / queries.shape[1] if queries.ndim == 3 else score


def open_store(store_dir: Path, *, url: str | None = None, api_key: str | None = None,
               write: bool = True) -> VectorStore:
    """The embedded store under store_dir, or the Qdrant server at url when one is given. write=False
    (commands that only read) lets the embedded store answer from a disk it cannot write."""
    if url:
        from .server import ServerStore

        return ServerStore(url, api_key=api_key)
    from .edge import EdgeStore

    return EdgeStore(store_dir / "qdrant", write=write)
