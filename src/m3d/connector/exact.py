"""FAISS flat inner-product search per collection: exact answers to validate Qdrant's.

Derived data, kept in step with Qdrant row by row (add, replace, remove by point id) instead of being
rebuilt from all of Qdrant after every change. The rows live in one file, written in place with
positioned writes and read through a memory map, so a sync's memory does not grow with the collection:
a one-file change writes a few rows, never the matrix. The file records the collection it describes
and that collection's generation (a random token every m3d write advances in the collection itself,
see store.Session): an index whose collection or generation differs from what Qdrant holds now never
answers. The first change after a commit clears the generation on disk (fsynced) before any row
moves, so a crash half-way leaves a file that is never trusted, never mixed rows that pass as current.

Layout (format 3): a 4 KiB header (magic + JSON: dim, rows, capacity, collection, generation, views),
then `capacity` ids (ASCII, 36 bytes), then `capacity` float32 rows. Capacity doubles by a streamed copy.
A multivector collection's row is its object's `views` unit vectors side by side (views x D dims,
searched by MaxSim, see m3d.maxsim); a header without views (older files) holds plain vectors.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

FORMAT = 3  # file layout version: older files are rebuilt, never misread
MAGIC = b"M3DEXACT"
HEADER = 4096
ID = np.dtype("S36")  # a point id (a UUID's text) as stored
FOLD = 65536  # id lookups kept beside the sorted snapshot before it is rebuilt
CHUNK_BYTES = 8 << 20  # streamed copies move this much at a time
MISSING = "is missing"  # why open() found no index: routine for a new collection, unlike the others


GPU_MAX_K = 2048  # the largest k FAISS's GPU k-selection takes


def faiss_gpus() -> int:
    """GPUs this FAISS build can use: 0 for faiss-cpu (no GPU resources) or where no GPU is visible."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


@functools.cache
def _gpu_resources():
    import faiss

    return faiss.StandardGpuResources()  # scratch memory and streams, made once per process


def knn(queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN (scores, row numbers): brute force on the GPU where a faiss-gpu build
    sees one (faiss.knn_gpu), else on the CPU (faiss.knn). Both are exact; they differ by float rounding."""
    import faiss

    if k <= GPU_MAX_K and faiss_gpus() > 0:
        return faiss.knn_gpu(_gpu_resources(), queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT)


class ExactIndex:
    """Unit rows with their point ids in one file; search is FAISS's exact inner-product k-NN."""

    def __init__(self, ids: list[str], vectors: np.ndarray, *, collection: str = "", generation: str | None = None,
                 path: Path | None = None, views: int = 1):
        """An index holding these rows: in a file at path (committed when generation is given), or in
        an anonymous temporary file (benchmarks, tests, a reader that cannot write the store).
        views > 1: each row is a multivector of that many views (vectors may come as (n, views, D))."""
        vectors = np.asarray(vectors, dtype=np.float32)
        vectors = vectors.reshape(len(vectors), -1) if vectors.ndim == 3 else vectors
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError("one vector row per id")
        handle = open(path, "w+b") if path is not None else tempfile.TemporaryFile()
        self._open(handle, path, {"dim": vectors.shape[1], "n": 0, "capacity": max(16, len(ids)),
                                  "collection": collection, "generation": None, "views": views})
        os.ftruncate(self._fd, self._row_offset(self._capacity))
        self._begin_change()
        self.upsert(list(ids), vectors)
        if self._n != len(ids):
            raise ValueError("duplicate point ids")
        if generation is not None:
            self.commit(generation)

    def _open(self, handle: BinaryIO, path: Path | None, header: dict) -> None:
        self._handle, self._fd, self._path = handle, handle.fileno(), path
        self._dim, self._n, self._capacity = int(header["dim"]), int(header["n"]), int(header["capacity"])
        self.collection: str = header["collection"]
        self.generation: str | None = header["generation"] or None
        self.views = int(header.get("views", 1))  # vectors per row: > 1 for a multivector collection
        if self.views < 1 or self._dim % self.views:
            raise ValueError(f"{self._dim} dims do not split into {self.views} views")
        self._dirty = False  # rows changed since the last commit (the file's generation is cleared)
        self._lookup: dict[str, int | None] = {}  # id -> row (None: removed) since the sorted snapshot
        self._keys: np.ndarray | None = None  # sorted ids and their rows: the lookup for unchanged ids
        self._key_rows = np.zeros(0, np.int64)
        self._views: tuple[np.ndarray, list[str]] | None = None

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return self._n

    @property
    def vectors(self) -> np.ndarray:
        """(n, dim) rows in the order of ids, memory-mapped read-only (no copy in memory)."""
        return self._read_views()[0]

    @property
    def ids(self) -> list[str]:
        """Point ids in row order (decoded once per change; readers index it freely)."""
        return self._read_views()[1]

    def id_at(self, row: int) -> str:
        return os.pread(self._fd, ID.itemsize, self._id_offset(row)).rstrip(b"\0").decode()

    def row(self, pid: str) -> int | None:
        if pid in self._lookup:
            return self._lookup[pid]
        if self._keys is None:
            self._snapshot()
        key = np.array([pid.encode()], ID)
        at = int(np.searchsorted(self._keys, key)[0])
        return int(self._key_rows[at]) if at < len(self._keys) and self._keys[at] == key[0] else None

    # -- keeping in step ---------------------------------------------------------------------
    def upsert(self, ids: list[str], vectors: np.ndarray) -> None:
        """Replace the rows of known ids, append the others (what a Qdrant upsert does); multivectors
        may come as (n, views, D)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        vectors = vectors.reshape(len(vectors), -1) if vectors.ndim == 3 else vectors
        if len(ids) != len(vectors) or (len(ids) and vectors.shape[1] != self._dim):
            raise ValueError(f"expected {len(ids)} rows of {self._dim} dims")
        if not ids:
            return
        encoded = {pid: _encode(pid) for pid in ids}  # a bad id is refused before anything changes
        self._begin_change()
        last: dict[str, int] = {}  # new ids -> their last place in this batch (a repeat replaces it)
        for i, pid in enumerate(ids):
            if pid in last:
                last[pid] = i
                continue
            row = self.row(pid)
            if row is None:
                last[pid] = i
            else:
                os.pwrite(self._fd, vectors[i].tobytes(), self._row_offset(row))
        if last:
            fresh = sorted(last.values())
            self._reserve(self._n + len(fresh))
            os.pwrite(self._fd, np.array([encoded[ids[j]] for j in fresh], ID).tobytes(), self._id_offset(self._n))
            os.pwrite(self._fd, vectors[fresh].tobytes(), self._row_offset(self._n))
            for offset, j in enumerate(fresh):  # only now: a failed write above leaves the lookup as it was
                self._lookup[ids[j]] = self._n + offset
            self._n += len(fresh)
        self._changed()

    def remove(self, ids: list[str]) -> None:
        """Drop the rows of these ids (unknown ids are ignored, like a Qdrant delete): the last row
        moves into each hole, so removal costs O(removed), not a rewrite of the matrix."""
        rows = [(pid, self.row(pid)) for pid in dict.fromkeys(ids)]
        if not any(row is not None for _, row in rows):
            return
        self._begin_change()
        for pid, _ in rows:
            row = self.row(pid)  # an earlier removal may have moved it
            if row is None:
                continue
            last = self._n - 1
            if row != last:
                moved = self.id_at(last)
                os.pwrite(self._fd, os.pread(self._fd, ID.itemsize, self._id_offset(last)), self._id_offset(row))
                os.pwrite(self._fd, os.pread(self._fd, 4 * self._dim, self._row_offset(last)), self._row_offset(row))
                self._lookup[moved] = row
            self._lookup[pid] = None
            self._n = last
        self._changed()

    def commit(self, generation: str | None) -> None:
        """Make the rows durable, then record the generation they describe (the header last; None:
        a collection without one, whose index is never trusted from disk)."""
        if self._path is not None:
            os.fsync(self._fd)
        self.generation, self._dirty = generation, False
        self._write_header()

    def _begin_change(self) -> None:
        if not self._dirty:  # from now on the file describes no generation until commit()
            self._dirty = True
            self._write_header()

    def _changed(self) -> None:
        self._views = None
        if len(self._lookup) > FOLD:  # sort the ids again: the changes held are in it now
            self._snapshot()

    def _snapshot(self) -> None:
        keys = np.empty(self._n, ID)
        for lo, hi in self._chunks(ID.itemsize):
            keys[lo:hi] = np.frombuffer(os.pread(self._fd, (hi - lo) * ID.itemsize, self._id_offset(lo)), ID)
        self._key_rows = np.argsort(keys, kind="stable")
        self._keys = keys[self._key_rows]
        self._lookup = {}

    def growth_bytes(self, rows: int) -> int:
        """Disk that adding rows may take first: a grown copy of the whole file (see _reserve)."""
        if self._path is None or self._n + rows <= self._capacity:
            return 0
        capacity = max(self._n + rows, 2 * self._capacity)
        return HEADER + capacity * (ID.itemsize + 4 * self._dim)

    def _reserve(self, rows: int) -> None:
        """Room for `rows` rows: a larger file holding the same rows (streamed copy), swapped in. A copy
        that fails (a full disk) leaves the index and its file as they were, and no partial file."""
        if rows <= self._capacity:
            return
        capacity = max(rows, 2 * self._capacity)
        grow_path = self._grow_path()
        grown = open(grow_path, "w+b") if grow_path else tempfile.TemporaryFile()
        try:
            new_rows = HEADER + capacity * ID.itemsize
            os.ftruncate(grown.fileno(), new_rows + capacity * 4 * self._dim)
            for size, src, dst in ((ID.itemsize, self._id_offset(0), self._id_offset(0)),
                                   (4 * self._dim, self._row_offset(0), new_rows)):
                for lo, hi in self._chunks(size):
                    os.pwrite(grown.fileno(), os.pread(self._fd, (hi - lo) * size, src + lo * size), dst + lo * size)
            os.pwrite(grown.fileno(), self._header(capacity), 0)  # a kill after the swap finds a header
        except BaseException:
            grown.close()
            if grow_path:
                grow_path.unlink(missing_ok=True)
            raise
        self._views = None
        self._handle.close()
        if grow_path is not None:
            os.replace(grow_path, self._path)
        self._handle, self._fd, self._capacity = grown, grown.fileno(), capacity
        self._write_header()

    def _grow_path(self) -> Path | None:
        return self._path.with_name(self._path.name + ".grow") if self._path is not None else None

    # -- search ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Scores (q, k) and ids of the k nearest rows for every query (fewer when the index is small).
        A multivector index takes (q, m, D) queries (or flat rows of m x D) and ranks by exact MaxSim."""
        from ..maxsim import knn as maxsim_knn

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self._n)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), [[] for _ in queries]
        if self.views > 1 or queries.ndim == 3:
            scores, rows = maxsim_knn(queries, self.vectors, k, self.views)
        else:
            scores, rows = knn(queries, self.vectors, k)
        return scores, [[self.id_at(r) for r in row if r >= 0] for row in rows]

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path, name: str) -> "ExactIndex | None":
        """The saved index, or None when there is none, it cannot be read, or it has an older layout."""
        return cls.open(directory, name)[0]

    @classmethod
    def open(cls, directory: Path, name: str) -> "tuple[ExactIndex | None, str | None]":
        """The saved index and None, or None and why it cannot be used (missing, a directory, emptied,
        cut short, a garbled header, an older layout). Opened for writing where the store allows it
        (a sync updates it in place), else read-only."""
        path = path_of(directory, name)
        try:
            try:
                handle = open(path, "r+b")
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                handle = open(path, "rb")
        except FileNotFoundError:
            return None, MISSING
        except IsADirectoryError:
            return None, "is a directory, not a file"
        except OSError as exc:
            return None, f"cannot be opened ({exc.strerror})"
        try:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise _Unusable("is empty")
            index = cls.__new__(cls)
            index._open(handle, path, _read_header(handle))
            if index._n > index._capacity or size < index._row_offset(index._capacity):
                raise _Unusable(f"is cut short ({size:,} of its {index._row_offset(index._capacity):,} bytes)")
            return index, None
        except (OSError, ValueError, KeyError, TypeError) as exc:  # truncated, garbled, old layout
            handle.close()
            return None, str(exc) if isinstance(exc, _Unusable) else f"has a garbled header ({type(exc).__name__})"

    @classmethod
    def build(cls, directory: Path, name: str, dim: int, collection: str, views: int = 1) -> "ExactIndex":
        """An empty index in a new file beside the saved one; `move_to` puts it in its place."""
        path = path_of(directory, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls([], np.zeros((0, dim), np.float32), collection=collection, path=path.with_name(path.name + ".tmp"),
                   views=views)

    def move_to(self, directory: Path, name: str) -> None:
        """Replace the index saved under name by this one's file, atomically (the file stays open)."""
        target = path_of(directory, name)
        os.replace(self._path, target)
        self._path = target
        _legacy(target).unlink(missing_ok=True)

    def close(self) -> None:
        self._views = None
        self._handle.close()

    def discard(self) -> None:
        """Close and delete a half-built index's file (a failed rebuild leaves nothing behind)."""
        self.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._grow_path().unlink(missing_ok=True)  # a growth killed half-way

    @staticmethod
    def remove_file(directory: Path, name: str) -> None:
        path_of(directory, name).unlink(missing_ok=True)
        _legacy(path_of(directory, name)).unlink(missing_ok=True)

    # -- layout ------------------------------------------------------------------------------
    def _id_offset(self, row: int) -> int:
        return HEADER + row * ID.itemsize

    def _row_offset(self, row: int) -> int:
        return HEADER + self._capacity * ID.itemsize + row * 4 * self._dim

    def _chunks(self, row_bytes: int):
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        return [(lo, min(lo + step, self._n)) for lo in range(0, self._n, step)]

    def _header(self, capacity: int) -> bytes:
        generation = "" if self._dirty else self.generation or ""  # rows in motion describe no generation
        meta = json.dumps({"format": FORMAT, "dim": self._dim, "n": self._n, "capacity": capacity,
                           "collection": self.collection, "generation": generation, "views": self.views}).encode()
        if len(MAGIC) + len(meta) > HEADER:
            raise ValueError("collection name too long for the FAISS header")
        return (MAGIC + meta).ljust(HEADER, b" ")

    def _write_header(self) -> None:
        os.pwrite(self._fd, self._header(self._capacity), 0)
        if self._path is not None:
            os.fsync(self._fd)

    def _read_views(self) -> tuple[np.ndarray, list[str]]:
        if self._views is None:
            if self._n == 0:
                vectors = np.zeros((0, self._dim), np.float32)
            else:
                vectors = np.memmap(self._handle, np.float32, "r", self._row_offset(0), (self._n, self._dim))
            raw = np.memmap(self._handle, ID, "r", self._id_offset(0), (self._n,)) if self._n else []
            self._views = (vectors, [b.decode() for b in np.asarray(raw).tolist()])
        return self._views

class _Unusable(ValueError):
    """Why a saved file cannot be read as an index (its text completes "the FAISS index of X ...")."""


def _encode(pid: str) -> bytes:
    raw = pid.encode("ascii")
    if len(raw) > ID.itemsize or raw.endswith(b"\0"):
        raise ValueError(f"point id {pid!r} is not a UUID")
    return raw


def _read_header(handle: BinaryIO) -> dict:
    raw = os.pread(handle.fileno(), HEADER, 0)
    if len(raw) < HEADER:
        raise _Unusable(f"is cut short ({len(raw):,} bytes, less than its header)")
    if not raw.startswith(MAGIC):
        raise _Unusable("has a garbled header (not an m3d FAISS file)")
    try:
        header = json.loads(raw[len(MAGIC):].decode())
    except ValueError:
        raise _Unusable("has a garbled header (unreadable settings)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _Unusable("has another layout (an older m3d)")
    return header


def path_of(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.faiss"


def _legacy(path: Path) -> Path:
    """Where the previous layout (format 2, an npz) lived: removed once its replacement is saved."""
    return path.with_name(path.name + ".npz")
