"""Embedded Qdrant: qdrant-edge (Qdrant's Rust engine in process), one shard directory per collection.

Layout under the root: `<collection>/m3d.json` (dim, written first) and `<collection>/shard/` (the
engine's segments and WAL). qdrant-edge has no background optimizer, so plain search is exact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import StoreBusyError, StoreError
from ..schemas import INDEXED_KEYWORDS
from . import Hit, Record

PAGE = 1024


def _engine():
    import qdrant_edge

    return qdrant_edge


def _engine_error(exc: Exception, where: Path) -> Exception:
    """qdrant-edge raises bare Exceptions; turn the ones a user can act on into one-liners."""
    text = str(exc)
    if "WouldBlock" in text or "lock" in text.lower():
        return StoreBusyError(f"store {where} is busy: another m3d process has it open")
    return StoreError(f"embedded Qdrant at {where}: {text.splitlines()[0] if text else type(exc).__name__}")


class EdgeStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = f"embedded Qdrant (qdrant-edge) at {self.root.resolve()}"
        self._shards: dict[str, object] = {}

    # -- collections -------------------------------------------------------------------------
    def _meta_path(self, name: str) -> Path:
        return self.root / name / "m3d.json"

    def collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/m3d.json"))

    def dim(self, name: str) -> int:
        try:
            return int(json.loads(self._meta_path(name).read_text())["dim"])
        except FileNotFoundError:
            raise StoreError(f"no collection {name!r} in {self.root}") from None

    def ensure_collection(self, name: str, dim: int) -> None:
        meta = self._meta_path(name)
        if meta.exists():
            if self.dim(name) != dim:
                raise StoreError(f"collection {name} holds {self.dim(name)}-d vectors, not {dim}-d")
        else:
            meta.parent.mkdir(parents=True, exist_ok=True)
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps({"dim": dim, "distance": "cosine"}))
            tmp.replace(meta)
        self._shard(name)

    def drop_collection(self, name: str) -> None:
        shard = self._shards.pop(name, None)
        if shard is not None:
            shard.close()
        shutil.rmtree(self.root / name, ignore_errors=True)

    def _shard(self, name: str):
        shard = self._shards.get(name)
        if shard is not None:
            return shard
        q = _engine()
        path = self.root / name / "shard"
        dim = self.dim(name)
        try:
            if path.exists() and any(path.iterdir()):
                shard = q.EdgeShard.load(str(path))
            else:
                config = q.EdgeConfig(vectors=q.EdgeVectorParams(size=dim, distance=q.Distance.Cosine))
                shard = q.EdgeShard.create(str(path), config)
                for key in INDEXED_KEYWORDS:
                    shard.update(q.UpdateOperation.create_field_index(key, q.PayloadSchemaType.Keyword))
        except Exception as exc:  # the engine raises bare Exception
            raise _engine_error(exc, path) from None
        self._shards[name] = shard
        return shard

    # -- points ------------------------------------------------------------------------------
    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        q = _engine()
        points = [q.Point(pid, vec, payload) for pid, vec, payload in zip(ids, vectors.tolist(), payloads)]
        self._update(name, q.UpdateOperation.upsert_points(points))

    def delete(self, name: str, ids: list[str]) -> None:
        if ids:
            self._update(name, _engine().UpdateOperation.delete_points(list(ids)))

    def _update(self, name: str, operation) -> None:
        try:
            self._shard(name).update(operation)
        except Exception as exc:
            raise _engine_error(exc, self.root / name) from None

    def count(self, name: str) -> int:
        return self._shard(name).count(_engine().CountRequest(exact=True))

    def records(self, name: str, *, fields: list[str] | None = None, vectors: bool = False) -> Iterator[Record]:
        q = _engine()
        shard = self._shard(name)
        offset = None
        while True:
            page, offset = shard.scroll(
                q.ScrollRequest(offset=offset, limit=PAGE, with_payload=fields if fields else True, with_vector=vectors)
            )
            for rec in page:
                yield Record(str(rec.id), rec.payload or {}, _as_array(rec.vector) if vectors else None)
            if offset is None:
                return

    def retrieve(self, name: str, ids: list[str]) -> list[Record]:
        found = self._shard(name).retrieve(list(ids), with_payload=True, with_vector=False)
        by_id = {str(r.id): Record(str(r.id), r.payload or {}) for r in found}
        return [by_id[i] for i in ids if i in by_id]

    def search(self, name: str, queries: np.ndarray, k: int, *, label: str | None = None) -> list[list[Hit]]:
        q = _engine()
        flt = None
        if label is not None:
            flt = q.Filter(must=[q.FieldCondition(key="class", match=q.MatchValue(label))])
        requests = [
            q.QueryRequest(limit=k, query=q.Query.Nearest(vec), with_payload=True, filter=flt)
            for vec in np.asarray(queries, dtype=np.float32).tolist()
        ]
        answers = self._shard(name).query_batch(q.QueryBatchRequest(requests))
        return [[Hit(str(p.id), float(p.score), p.payload or {}) for p in points] for points in answers]

    def facet(self, name: str, key: str) -> dict[str, int]:
        q = _engine()
        response = self._shard(name).facet(q.FacetRequest(key, limit=100_000, exact=True))
        return {str(h.value): int(h.count) for h in response.hits}

    def flush(self) -> None:
        for shard in self._shards.values():
            shard.flush()

    def close(self) -> None:
        for shard in self._shards.values():
            try:
                shard.flush()
            finally:
                shard.close()
        self._shards.clear()


def _as_array(vector) -> np.ndarray:
    if isinstance(vector, dict):  # named vectors: ours is the default, unnamed one
        vector = vector.get("", next(iter(vector.values())))
    return np.asarray(vector, dtype=np.float32)
