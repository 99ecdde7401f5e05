"""Embedded Qdrant: qdrant-edge (Qdrant's Rust engine in process), one shard directory per collection.

Layout under the root: `<collection>/m3d.json` (dim, written first) and `<collection>/shard/` (the
engine's segments and WAL). qdrant-edge has no background optimizer, so plain search is exact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from ..errors import StoreBusyError, StoreError, no_space
from ..schemas import INDEXED_KEYWORDS
from . import Hit, Record

PAGE = 1024
#: Room every write leaves free. The engine grows its files in 32 MB memory-mapped chunks, and a page
#: the disk cannot hold kills the process with SIGBUS (nothing to catch, nothing printed): refuse first.
SPARE_BYTES = 64 << 20
#: Bytes a point costs on disk beyond its vector (payload, WAL entry, id tracker), generously.
POINT_OVERHEAD = 4096
T = TypeVar("T")


def _engine():
    import qdrant_edge

    return qdrant_edge


def _engine_error(exc: Exception, root: Path, name: str) -> Exception:
    """qdrant-edge raises bare Exceptions: a second opener's WAL lock means busy, a full disk says so
    with the space left; anything else is named with the collection and what tells damage apart."""
    text = str(exc)
    if "WouldBlock" in text:
        return StoreBusyError(f"store {root.parent} is busy: another m3d process has it open")
    if "No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return no_space(root)
    first = text.splitlines()[0] if text else type(exc).__name__
    return StoreError(f"collection {name} cannot be read ({first}): `m3d check` says whether it is damaged, "
                      "`m3d check --repair` sets a damaged one aside for `m3d sync` to rebuild")


class EdgeStore:
    def __init__(self, root: Path, *, write: bool = True):
        self.root = Path(root)
        self.write = write
        self.location = f"embedded Qdrant (qdrant-edge) at {self.root.resolve()}"
        self._shards: dict[str, object] = {}
        self._copies: dict[str, Path] = {}  # collection -> private copy opened because the store is read-only

    # -- collections -------------------------------------------------------------------------
    def _meta_path(self, name: str) -> Path:
        return self.root / name / "m3d.json"

    def collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/m3d.json"))

    def dim(self, name: str) -> int:
        """The collection's dimension from m3d.json, checked against the shard's own settings."""
        meta = self._meta_path(name)
        if not meta.exists():
            raise StoreError(f"no collection {name!r} in {self.root}")
        try:
            dim = json.loads(meta.read_text())["dim"]
            if not isinstance(dim, int) or dim < 1:
                raise ValueError(f"dim {dim!r}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"collection {name}: {meta} is damaged ({type(exc).__name__}): "
                             "`m3d check --repair` writes it again from the shard's settings") from None
        held = self._shard_dim(name)
        if held is not None and held != dim:
            raise StoreError(f"collection {name}: {meta} says {dim}-d but its shard holds {held}-d vectors: "
                             "`m3d check --repair` writes it again from the shard's settings")
        return dim

    def _shard_dim(self, name: str) -> int | None:
        """The dimension the engine itself recorded when it created the shard (None when unreadable)."""
        try:
            config = json.loads((self.root / name / "shard" / "edge_config.json").read_text())
            return int(config["vectors"][""]["size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_meta(self, name: str, dim: int) -> None:
        meta = self._meta_path(name)
        meta.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dim": dim, "distance": "cosine"}))
        tmp.replace(meta)

    def require_space(self, need: int = 0) -> None:
        """Refuse a write (one line, nothing touched) unless need bytes fit and SPARE_BYTES stay free."""
        where = self.root if self.root.exists() else self.root.parent
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            return  # nothing to measure yet: the write itself will say what is wrong
        if free < need + SPARE_BYTES:
            raise no_space(self.root.parent, SPARE_BYTES)

    def ensure_collection(self, name: str, dim: int) -> None:
        if self._meta_path(name).exists():
            if self.dim(name) != dim:
                raise StoreError(f"collection {name} holds {self.dim(name)}-d vectors, not {dim}-d")
        else:
            self.require_space()
            self._write_meta(name, dim)
        self._index_payload(name)  # also brings back indexes lost with a segments/ directory

    def _missing_indexes(self, name: str) -> list[str]:
        schema = self._run(name, lambda shard: shard.info().payload_schema)
        return [key for key in INDEXED_KEYWORDS if key not in schema]

    def _index_payload(self, name: str) -> list[str]:
        q = _engine()
        missing = self._missing_indexes(name)
        for key in missing:
            self._run(name, lambda shard, key=key: shard.update(
                q.UpdateOperation.create_field_index(key, q.PayloadSchemaType.Keyword)))
        return missing

    def problems(self, name: str) -> list[str]:
        """Damage to the collection's own files that `repair` can fix (one line each)."""
        try:
            self.dim(name)
        except StoreError as exc:
            return [str(exc)]
        missing = self._missing_indexes(name)
        return [f"collection {name} has no payload index on {', '.join(missing)}: `m3d check --repair` builds it"] \
            if missing else []

    def repair(self, name: str) -> list[str]:
        """Write m3d.json again from the shard's settings and rebuild missing payload indexes."""
        done = []
        held = self._shard_dim(name)
        try:
            self.dim(name)
        except StoreError:
            if held is None:
                raise StoreError(f"collection {name}: neither m3d.json nor the shard's settings can be read: "
                                 "`m3d check --repair` sets it aside") from None
            self._write_meta(name, held)
            done.append(f"wrote m3d.json again ({held}-d)")
        missing = self._index_payload(name)
        if missing:
            done.append(f"built payload index on {', '.join(missing)}")
        return done

    def set_aside(self, name: str, where: Path) -> Path:
        """Move a damaged collection out of the store (kept for inspection): `m3d sync` makes it anew."""
        shard = self._shards.pop(name, None)
        if shard is not None:
            try:
                shard.close()
            except Exception:  # a damaged shard may fail to close; it is being moved away
                pass
        where.mkdir(parents=True, exist_ok=True)
        target = where / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(self.root / name), str(target))
        return target

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
                shard = q.EdgeShard.load(str(self._openable(name, path)))
            else:
                config = q.EdgeConfig(vectors=q.EdgeVectorParams(size=dim, distance=q.Distance.Cosine))
                shard = q.EdgeShard.create(str(path), config)
        except Exception as exc:  # the engine raises bare Exception
            raise _engine_error(exc, self.root, name) from None
        self._shards[name] = shard
        return shard

    def _openable(self, name: str, path: Path) -> Path:
        """The shard directory to open: the store's own, or, for a reader, a private copy when the
        store cannot be written (a read-only mount, a published store) or its disk is full, since the
        engine writes to its files even to open them (on a full disk: SIGBUS). Holes stay holes: the
        engine's 32 MB mmap files are mostly empty."""
        if self.write or (os.access(path, os.W_OK) and shutil.disk_usage(path).free >= SPARE_BYTES):
            return path
        scratch = Path(tempfile.mkdtemp(prefix=f"m3d-readonly-{name}-"))
        self._copies[name] = scratch
        try:
            shutil.copytree(path, scratch / "shard", copy_function=_copy_sparse)
        except OSError as exc:
            raise StoreError(f"collection {name}: the store is read-only and its private copy in {scratch.parent} "
                             f"failed ({exc.strerror})") from None
        return scratch / "shard"

    def _run(self, name: str, call: Callable[[object], T]) -> T:
        """One engine call on a collection's shard, its bare Exceptions turned into one-line errors."""
        shard = self._shard(name)
        try:
            return call(shard)
        except Exception as exc:
            raise _engine_error(exc, self.root, name) from None

    # -- points ------------------------------------------------------------------------------
    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        q = _engine()
        self.require_space(2 * len(ids) * (vectors.shape[1] * 4 + POINT_OVERHEAD))  # segment + WAL
        points = [q.Point(pid, vec, payload) for pid, vec, payload in zip(ids, vectors.tolist(), payloads)]
        self._update(name, q.UpdateOperation.upsert_points(points))

    def set_payload(self, name: str, payloads: dict[str, dict]) -> None:
        q = _engine()
        for pid, keys in payloads.items():
            self._update(name, q.UpdateOperation.set_payload([pid], keys))

    def delete(self, name: str, ids: list[str]) -> None:
        if ids:
            self._update(name, _engine().UpdateOperation.delete_points(list(ids)))

    def _update(self, name: str, operation) -> None:
        if name in self._copies:
            raise StoreError(f"store {self.root.parent} cannot be written: it was opened read-only")
        self._run(name, lambda shard: shard.update(operation))

    def count(self, name: str) -> int:
        return self._run(name, lambda shard: shard.count(_engine().CountRequest(exact=True)))

    def records(self, name: str, *, fields: list[str] | None = None, vectors: bool = False) -> Iterator[Record]:
        q = _engine()
        offset = None
        while True:
            request = q.ScrollRequest(offset=offset, limit=PAGE, with_payload=fields if fields else True,
                                      with_vector=vectors)
            page, offset = self._run(name, lambda shard: shard.scroll(request))
            for rec in page:
                yield Record(str(rec.id), rec.payload or {}, _as_array(rec.vector) if vectors else None)
            if offset is None:
                return

    def retrieve(self, name: str, ids: list[str]) -> list[Record]:
        found = self._run(name, lambda shard: shard.retrieve(list(ids), with_payload=True, with_vector=False))
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
        answers = self._run(name, lambda shard: shard.query_batch(q.QueryBatchRequest(requests)))
        return [[Hit(str(p.id), float(p.score), p.payload or {}) for p in points] for points in answers]

    def facet(self, name: str, key: str) -> dict[str, int]:
        q = _engine()
        if key in INDEXED_KEYWORDS and key in self._missing_indexes(name):
            raise StoreError(f"collection {name} has no payload index on {key}: `m3d check --repair` builds it")
        response = self._run(name, lambda shard: shard.facet(q.FacetRequest(key, limit=100_000, exact=True)))
        return {str(h.value): int(h.count) for h in response.hits}

    def flush(self) -> None:
        for name in list(self._shards):
            self._run(name, lambda shard: shard.flush())

    def close(self) -> None:
        """Flush and close every shard, all of them even when one fails (the first failure is raised)."""
        error = None
        for name, shard in self._shards.items():
            for step in (shard.flush, shard.close):
                try:
                    step()
                except Exception as exc:
                    error = error or _engine_error(exc, self.root, name)
        self._shards.clear()
        for scratch in self._copies.values():
            shutil.rmtree(scratch, ignore_errors=True)
        self._copies.clear()
        if error is not None:
            raise error


def _copy_sparse(src: str, dst: str) -> None:
    """shutil.copy2 that copies only the data regions (SEEK_DATA/SEEK_HOLE) and keeps the holes."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            while start < end:
                chunk = fin.read(min(end - start, 1 << 20))
                if not chunk:
                    break
                fout.write(chunk)
                start += len(chunk)
            offset = end
        fout.truncate(size)
    shutil.copystat(src, dst)


def _as_array(vector) -> np.ndarray:
    if isinstance(vector, dict):  # named vectors: ours is the default, unnamed one
        vector = vector.get("", next(iter(vector.values())))
    return np.asarray(vector, dtype=np.float32)
