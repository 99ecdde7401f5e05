"""FAISS flat inner-product index per collection: exact answers to validate Qdrant's.

Derived data: built from the vectors Qdrant holds and written atomically (one file: index + ids), so a
crash never leaves a half-written index behind; the store marks it stale before Qdrant changes.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def ids_digest(ids: list[str]) -> str:
    """Order-independent digest of a set of ids: equal digests mean FAISS and Qdrant hold the same points."""
    digest = hashlib.blake2b(digest_size=16)
    for pid in sorted(ids):
        digest.update(pid.encode())
    return digest.hexdigest()


@dataclass
class ExactIndex:
    ids: list[str]
    vectors: np.ndarray  # (n, dim) float32, unit rows

    def __post_init__(self):
        import faiss

        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        if len(self.ids):
            self.index.add(self.vectors)

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Scores (q, k) and ids of the k nearest rows for every query (fewer when the index is small)."""
        k = min(k, len(self.ids))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    def save(self, directory: Path, name: str) -> None:
        """One file (the serialised FAISS index and its ids together), replaced atomically: a crash
        leaves either the old pair or the new one, never new rows with old ids."""
        import faiss

        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{name}.faiss.npz"
        tmp = directory / f"{name}.faiss.npz.tmp"
        with open(tmp, "wb") as handle:
            np.savez(handle, index=faiss.serialize_index(self.index), ids=np.array(self.ids, dtype="U36"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    @classmethod
    def load(cls, directory: Path, name: str) -> "ExactIndex | None":
        """The saved index, or None when there is none or it cannot be read."""
        import faiss

        try:
            with np.load(directory / f"{name}.faiss.npz") as data:
                index = faiss.deserialize_index(data["index"])
                ids = [str(i) for i in data["ids"]]
        except (OSError, RuntimeError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing or damaged
            return None
        if index.ntotal != len(ids):
            return None
        vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
        return cls(ids, vectors)

    @staticmethod
    def remove(directory: Path, name: str) -> None:
        (directory / f"{name}.faiss.npz").unlink(missing_ok=True)
