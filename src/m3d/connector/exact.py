"""FAISS flat inner-product index per collection: exact answers to validate Qdrant's.

Derived data: built from the vectors Qdrant holds, written atomically (temp file + rename) together
with its id list and a manifest, so a crash never leaves a half-written index behind.
"""

from __future__ import annotations

import hashlib
import json
import os
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
        import faiss

        directory.mkdir(parents=True, exist_ok=True)
        base = directory / name
        tmp_index, tmp_ids = base.with_suffix(".faiss.tmp"), base.with_suffix(".ids.tmp")
        faiss.write_index(self.index, str(tmp_index))
        tmp_ids.write_text(json.dumps(self.ids))
        _fsync(tmp_index)
        _fsync(tmp_ids)
        os.replace(tmp_index, base.with_suffix(".faiss"))
        os.replace(tmp_ids, base.with_suffix(".ids.json"))

    @classmethod
    def load(cls, directory: Path, name: str) -> "ExactIndex | None":
        """The saved index, or None when there is none or its two files disagree."""
        import faiss

        base = directory / name
        try:
            index = faiss.read_index(str(base.with_suffix(".faiss")))
            ids = json.loads(base.with_suffix(".ids.json").read_text())
        except (OSError, RuntimeError, ValueError):
            return None
        if index.ntotal != len(ids):
            return None
        vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
        return cls(ids, vectors)

    @staticmethod
    def remove(directory: Path, name: str) -> None:
        for suffix in (".faiss", ".ids.json"):
            (directory / name).with_suffix(suffix).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
