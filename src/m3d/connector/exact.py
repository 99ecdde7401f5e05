"""FAISS flat inner-product search per collection: exact answers to validate Qdrant's.

Derived data, kept in step with Qdrant row by row (add, replace, remove by point id) instead of being
rebuilt from all of Qdrant after every change. Each saved index records the collection it describes
and that collection's generation (a random token every m3d write advances in the collection itself,
see store.Session): an index whose collection or generation differs from what Qdrant holds now never
answers. Written atomically (one file: rows, ids, generation), so a crash leaves the old file or the
new one, never new rows with old ids.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

FORMAT = 2  # file layout version: older files are rebuilt, never misread


class ExactIndex:
    """Unit rows with their point ids; search is FAISS's exact inner-product k-NN over the rows."""

    def __init__(self, ids: list[str], vectors: np.ndarray, *, collection: str = "", generation: str | None = None):
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError("one vector row per id")
        self._rows = np.array(vectors, dtype=np.float32, order="C")  # capacity grows by doubling
        self._n = len(ids)
        self.ids = list(ids)
        self._row_of = {pid: row for row, pid in enumerate(self.ids)}
        if len(self._row_of) != len(self.ids):
            raise ValueError("duplicate point ids")
        self.collection = collection
        self.generation = generation

    @property
    def dim(self) -> int:
        return self._rows.shape[1]

    @property
    def vectors(self) -> np.ndarray:
        """(n, dim) rows in the order of ids (a view: no copy)."""
        return self._rows[: self._n]

    def __len__(self) -> int:
        return self._n

    def row(self, pid: str) -> int | None:
        return self._row_of.get(pid)

    # -- keeping in step ---------------------------------------------------------------------
    def upsert(self, ids: list[str], vectors: np.ndarray) -> None:
        """Replace the rows of known ids, append the others (what a Qdrant upsert does)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(ids) != len(vectors) or (len(ids) and vectors.shape[1] != self.dim):
            raise ValueError(f"expected {len(ids)} rows of {self.dim} dims")
        for pid, vector in zip(ids, vectors):
            row = self._row_of.get(pid)
            if row is None:
                row = self._append(pid)
            self._rows[row] = vector

    def remove(self, ids: list[str]) -> None:
        """Drop the rows of these ids (unknown ids are ignored, like a Qdrant delete): the last row
        moves into each hole, so removal costs O(removed), not a rewrite of the matrix."""
        for pid in ids:
            row = self._row_of.pop(pid, None)
            if row is None:
                continue
            last = self._n - 1
            if row != last:
                moved = self.ids[last]
                self._rows[row] = self._rows[last]
                self.ids[row] = moved
                self._row_of[moved] = row
            self.ids.pop()
            self._n = last

    def _append(self, pid: str) -> int:
        if self._n == len(self._rows):
            grown = np.empty((max(16, 2 * len(self._rows)), self.dim), np.float32)
            grown[: self._n] = self._rows[: self._n]
            self._rows = grown
        self.ids.append(pid)
        self._row_of[pid] = self._n
        self._n += 1
        return self._n - 1

    # -- search ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Scores (q, k) and ids of the k nearest rows for every query (fewer when the index is small)."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self._n)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), [[] for _ in queries]
        scores, rows = faiss.knn(queries, self.vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: Path, name: str) -> None:
        """One file (rows, ids, collection and generation together), replaced atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        target = path_of(directory, name)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, format=np.int64(FORMAT), vectors=self.vectors, ids=np.array(self.ids, dtype="U36"),
                     collection=np.str_(self.collection), generation=np.str_(self.generation or ""))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    @classmethod
    def load(cls, directory: Path, name: str) -> "ExactIndex | None":
        """The saved index, or None when there is none, it cannot be read, or it has an older layout."""
        try:
            with np.load(path_of(directory, name), allow_pickle=False) as data:
                if int(data["format"]) != FORMAT:
                    return None
                return cls([str(i) for i in data["ids"]], data["vectors"], collection=str(data["collection"]),
                           generation=str(data["generation"]) or None)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, truncated, garbled, old layout
            return None

    @staticmethod
    def remove_file(directory: Path, name: str) -> None:
        path_of(directory, name).unlink(missing_ok=True)


def path_of(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.faiss.npz"
