"""Embedded Qdrant: qdrant-edge (Qdrant's Rust engine in process), one shard directory per collection.

Layout under the root: `<collection>/m3d.json` (dim, views of a multivector collection, index settings
and generation token, written first) and `<collection>/shard/` (the engine's segments and WAL); `aliases.json` names the version
directory (`<collection>--v<N>`) a collection reads from after a zero-downtime rebuild. qdrant-edge has
no background optimiser: segments stay brute-force searched until `optimize()` builds their HNSW graph
(m3d calls it at the end of a sync).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from ..errors import StoreBusyError, StoreError, no_space
from ..schemas import INDEXED_KEYWORDS
from . import (PAGE, VECTOR_PAGE, VERSION, Hit, IndexInfo, IndexSettings, Record, SearchSettings, multi_score,
               shape_text, write_bytes)

#: A page the disk cannot hold kills the process with SIGBUS (nothing to catch, nothing printed), so
#: every write is refused first unless what it needs fits: its points (write_bytes), the holes of the
#: shard files the engine fills when it opens a shard for writing (measured on tmpfs: opening a 4-point
#: shard filled 48 MB of its payload files), a new shard (measured: 7 MB with its payload indexes) and
#: this margin for m3d's own small files.
MARGIN_BYTES = 8 << 20
NEW_SHARD_BYTES = 16 << 20
META_PREFIX = "m3d_"  # keys of set_metadata in m3d.json, apart from the store's own (dim, index, generation)
ALIASES = "aliases.json"  # collection name -> the version directory readers use
#: Shard files the engine rewrites whenever it opens a shard, even to read: memory-mapped flags (an indexed
#: segment's deleted.dat among them), trackers and the journals it keeps of them until closed, status words,
#: its own config, and the point versions it rewrites on the first open after a delete. They are left out of
#: a collection's signature; every other file (vectors, payload pages, id mappings, WAL, HNSW graphs) moves
#: only with a write, or with damage.
VOLATILE = frozenset({"tracker.dat", "tracker_journal.dat", "flags_a.dat", "flags_b.dat", "deleted.dat", "status.dat",
                      "segment.json", "edge_config.json", "mutable_id_tracker.versions"})
T = TypeVar("T")
log = logging.getLogger("m3d")


def _engine():
    import qdrant_edge

    return qdrant_edge


def _is_panic(exc: BaseException) -> bool:
    """pyo3 raises a Rust panic as pyo3_runtime.PanicException, a BaseException (not an Exception, and
    not importable): the engine met files it cannot read."""
    return type(exc).__name__ == "PanicException"


def _engine_failure(exc: BaseException) -> bool:
    """What an engine call can fail with: a bare Exception or a panic (never ctrl-C or an exit)."""
    return isinstance(exc, Exception) or _is_panic(exc)


_STDERR_LOCK = threading.Lock()  # one engine call at a time points fd 2 away
_scratch: list = []  # the file fd 2 points at during engine calls (made once per process)
#: What Rust prints for a panic: "thread '...' panicked at ...", the message, a backtrace when
#: RUST_BACKTRACE is set, and a closing "note: ..." line.
_PANIC_TEXT = re.compile(rb"\n?thread '[^\n]* panicked at .*?^note: [^\n]*\n?", re.S | re.M)


@contextmanager
def _quiet_engine():
    """Rust prints a panic, and with RUST_BACKTRACE ninety lines of backtrace, on fd 2 before pyo3 raises
    it; m3d turns the exception into one line, so during an engine call fd 2 points at a scratch file.
    Whatever else was written there meanwhile (another thread's log line) is passed on afterwards."""
    with _STDERR_LOCK:
        if not _scratch:
            _scratch.append(tempfile.TemporaryFile())
        scratch = _scratch[0].fileno()
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(scratch, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if os.fstat(scratch).st_size:
                text = _PANIC_TEXT.sub(b"", os.pread(scratch, os.fstat(scratch).st_size, 0))
                os.ftruncate(scratch, 0)
                if text:
                    os.write(2, text)


def _engine_error(exc: BaseException, root: Path, name: str) -> Exception:
    """qdrant-edge raises bare Exceptions (and panics): a second opener's WAL lock means busy, a full
    disk says so with the space left; anything else is named with the collection and the fix."""
    text = str(exc)
    if _is_panic(exc):
        first = text.splitlines()[0] if text else "a panic"
        return StoreError(f"collection {name} is damaged: the engine failed reading its files ({first}): "
                          "`m3d check --repair` sets it aside and `m3d sync` embeds it again")
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
        self._alias_cache: dict[str, str] | None = None

    # -- collections -------------------------------------------------------------------------
    def _meta_path(self, name: str) -> Path:
        return self.root / self.physical(name) / "m3d.json"

    # -- versions and aliases (zero-downtime rebuild) -----------------------------------------
    def _aliases(self) -> dict[str, str]:
        """Read once per open store (one process holds it: the store lock), kept current by writes."""
        if self._alias_cache is None:
            try:
                data = json.loads((self.root / ALIASES).read_text())
            except FileNotFoundError:
                data = {}
            except ValueError:
                raise StoreError(f"{self.root / ALIASES} is damaged (not JSON): restore it or re-sync with "
                                 "--rebuild") from None
            self._alias_cache = data if isinstance(data, dict) else {}
        return dict(self._alias_cache)

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (ALIASES + ".tmp")
        with open(tmp, "w") as handle:
            handle.write(json.dumps(aliases, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.root / ALIASES)
        self._alias_cache = dict(aliases)

    def physical(self, name: str) -> str:
        """The directory a collection name reads from now (its alias target, or itself)."""
        return self._aliases().get(name, name)

    def _physical_names(self) -> set[str]:
        """Collection directories: those with m3d.json, and shards that lost it (check names them)."""
        return {p.parent.name for p in self.root.glob("*/m3d.json")} | \
            {p.parents[1].name for p in self.root.glob("*/shard/edge_config.json")}

    def collections(self) -> list[str]:
        """Names readers use: aliases, and plain collections; versions being built stay hidden."""
        if not self.root.is_dir():
            return []
        aliases = self._aliases()
        physical = self._physical_names()
        targets = set(aliases.values())
        plain = {p for p in physical if VERSION not in p and p not in aliases}
        return sorted({a for a, t in aliases.items() if t in physical} | (plain - targets))

    def begin_rebuild(self, name: str) -> str:
        """A fresh version of a collection to fill while readers keep the current one; versions left
        by an interrupted rebuild are dropped first."""
        current = self.physical(name)
        versions = [p.name for p in self.root.glob(f"{name}{VERSION}*") if p.name != current]
        for version in versions:
            self._drop_physical(version)
        numbers = [int(v.rsplit(VERSION, 1)[1]) for v in [current, *versions] if VERSION in v
                   and v.rsplit(VERSION, 1)[1].isdigit()]
        return f"{name}{VERSION}{max(numbers, default=0) + 1}"

    def publish(self, name: str, version: str) -> None:
        """Point name at a complete version (one atomic file replace), then drop the old one."""
        old = self.physical(name)
        self._write_aliases({**self._aliases(), name: version})
        if old != version:
            self._drop_physical(old)

    def _drop_physical(self, physical: str) -> None:
        shard = self._shards.pop(physical, None)
        if shard is not None:
            shard.close()
        shutil.rmtree(self.root / physical, ignore_errors=True)

    def dim(self, name: str) -> int:
        """The collection's dimension from m3d.json, checked against the shard's own settings."""
        meta = self._meta_path(name)
        if not meta.exists() and not self._restore_meta(name):
            if self._shard_dim(name) is not None:
                raise StoreError(f"collection {name} has lost its m3d.json (its settings and generation): "
                                 "`m3d check --repair` or the next `m3d sync` writes it again from the shard's settings")
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

    def _restore_meta(self, name: str) -> bool:
        """A writer (sync) finding a shard that lost its m3d.json makes it whole from the shard's settings."""
        restored = self._shard_config(name) if self.write else None
        if restored is not None:
            self._write_meta(name, restored)
            log.warning("collection %s had lost its m3d.json: written again from its shard's settings", name)
        return restored is not None

    def _shard_dim(self, name: str) -> int | None:
        """The dimension the engine itself recorded when it created the shard (None when unreadable)."""
        config = self._shard_config(name, count_views=False)
        return config["dim"] if config else None

    def _shard_config(self, name: str, *, count_views: bool = True) -> dict | None:
        """m3d.json as the shard's own settings (edge_config.json) tell it, with a new generation (no
        FAISS file describes what is restored this way), or None when they cannot be read. A
        multivector shard's views per point are read from one of its points (count_views)."""
        try:
            config = json.loads((self.root / self.physical(name) / "shard" / "edge_config.json").read_text())
            vectors, hnsw = config["vectors"][""], config.get("hnsw_config") or {}
            dim, kb = int(vectors["size"]), int((config.get("optimizers") or {}).get("indexing_threshold") or 0)
            quantization = config.get("quantization_config") or {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        views = self._shard_views(name) if count_views and vectors.get("multivector_config") else None
        index = {"hnsw_m": hnsw.get("m"), "hnsw_ef_construct": hnsw.get("ef_construct"),
                 "on_disk": bool(vectors.get("on_disk")), "quantization": "int8" if "scalar" in quantization
                 else "binary" if "binary" in quantization else "none",
                 "index_threshold": _threshold_points(kb, dim * (views or 1))}
        return {"dim": dim, **({} if views is None else {"views": views}), "distance": "cosine",
                "index": {k: v for k, v in index.items() if v is not None}, "generation": uuid.uuid4().hex}

    def views(self, name: str) -> int | None:
        return self._meta(name).get("views")

    def _shard_views(self, name: str) -> int | None:
        """A multivector shard's views per point, read from one of its points (the engine records only
        that it holds multivectors); None for an empty or unreadable shard."""
        try:
            q = _engine()
            shard = self._shards.get(self.physical(name))
            own = shard is None  # m3d.json is unreadable, so _shard() cannot open it: open it here
            shard = shard or q.EdgeShard.load(str(self.root / self.physical(name) / "shard"))
            try:
                page, _ = shard.scroll(q.ScrollRequest(limit=1, with_payload=False, with_vector=True))
            finally:
                if own:
                    shard.close()
        except Exception:  # unreadable config or shard (the engine raises bare Exception): unknown
            return None
        return len(_as_array(page[0].vector)) if page else None

    def _meta(self, name: str) -> dict:
        """m3d.json, after dim() has checked it (so damage is named the same way everywhere)."""
        self.dim(name)
        return json.loads(self._meta_path(name).read_text())

    def require_space(self, need: int = 0) -> None:
        """Refuse a write (one line, nothing touched) unless need bytes and MARGIN_BYTES fit."""
        where = self.root if self.root.exists() else self.root.parent
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            return  # nothing to measure yet: the write itself will say what is wrong
        if free < need + MARGIN_BYTES:
            raise no_space(self.root.parent, need + MARGIN_BYTES)

    def _write_meta(self, name: str, meta: dict) -> None:
        """Atomically and durably: the generation must be on disk before the shard changes."""
        path = self._meta_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            handle.write(json.dumps(meta))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)

    def generation(self, name: str) -> str | None:
        return self._meta(name).get("generation")

    def set_generation(self, name: str, token: str) -> None:
        self._write_meta(name, {**self._meta(name), "generation": token})

    def metadata(self, name: str, key: str) -> object | None:
        return self._meta(name).get(META_PREFIX + key)

    def set_metadata(self, name: str, key: str, value: object) -> None:
        self._write_meta(name, {**self._meta(name), META_PREFIX + key: value})

    def signature(self, name: str) -> str | None:
        """A digest of the size, mtime, ctime and inode of the shard's files (but VOLATILE ones): any
        write, truncation or other change on disk, by anyone, moves it. About 50 stats per segment."""
        shard = self.root / self.physical(name) / "shard"
        if not shard.is_dir():
            return None
        digest = hashlib.blake2b(digest_size=16)
        for dirpath, dirnames, filenames in os.walk(shard):
            dirnames.sort()
            for file in sorted(filenames):
                if file in VOLATILE:
                    continue
                path = os.path.join(dirpath, file)
                try:
                    st = os.stat(path)
                except OSError:
                    return None
                digest.update(f"{os.path.relpath(path, shard)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
                              f"\0{st.st_ino}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def ensure_collection(self, name: str, dim: int, settings: IndexSettings = IndexSettings(),
                          views: int | None = None) -> None:
        settings.check_backend(server=False)
        if self._meta_path(name).exists() or self._restore_meta(name):
            if self.dim(name) != dim or self.views(name) != views:
                raise StoreError(f"collection {name} holds {shape_text(self.dim(name), self.views(name))} vectors, "
                                 f"not {shape_text(dim, views)}")
            differences = settings.differences(self.settings(name))
            if differences:
                raise StoreError(f"collection {name} was created with other index settings "
                                 f"({'; '.join(differences)}); run again with --rebuild to re-create it")
        else:
            self.require_space(NEW_SHARD_BYTES)  # before m3d.json: a refused sync leaves nothing behind
            multi = {} if views is None else {"views": views}
            self._write_meta(name, {"dim": dim, **multi, "distance": "cosine", "index": settings.resolved().to_dict()})
        self._index_payload(name)  # before any point; also brings back indexes lost with a segments/ directory

    def settings(self, name: str) -> IndexSettings:
        return IndexSettings.from_dict(self._meta(name).get("index"))

    def index_info(self, name: str) -> IndexInfo:
        info = self._run(name, lambda shard: shard.info())
        return IndexInfo(self.settings(name), int(info.points_count), int(info.indexed_vectors_count))

    def optimize(self, name: str) -> bool:
        """qdrant-edge has no background optimiser: build the HNSW graph and quantized vectors of every
        segment past the threshold now (blocking)."""
        return bool(self._run(name, lambda shard: shard.optimize()))

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
            self._write_meta(name, self._shard_config(name))
            done.append(f"wrote m3d.json again from the shard's settings ({held}-d)")
        missing = self._index_payload(name)
        if missing:
            done.append(f"built payload index on {', '.join(missing)}")
        return done

    def set_aside(self, name: str, where: Path) -> Path:
        """Move a damaged collection out of the store (kept for inspection): `m3d sync` makes it anew."""
        physical = self.physical(name)
        shard = self._shards.pop(physical, None)
        if shard is not None:
            try:
                with _quiet_engine():
                    shard.close()
            except BaseException as exc:  # a damaged shard may fail (or panic) to close; it is being moved away
                if not _engine_failure(exc):
                    raise
        where.mkdir(parents=True, exist_ok=True)
        target = where / f"{physical}-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(self.root / physical), str(target))
        return target

    def drop_collection(self, name: str) -> None:
        aliases = self._aliases()
        if name in aliases:
            target = aliases.pop(name)
            self._write_aliases(aliases)
            self._drop_physical(target)
        self._drop_physical(name)

    def _shard(self, name: str):
        physical = self.physical(name)
        shard = self._shards.get(physical)
        if shard is not None:
            return shard
        q = _engine()
        path = self.root / physical / "shard"
        dim = self.dim(name)
        try:
            if path.exists() and any(path.iterdir()):
                _check_segments(name, path)
                if self.write:
                    self.require_space(_fill_bytes(path))
                openable = self._openable(name, path)
                with _quiet_engine():
                    shard = q.EdgeShard.load(str(openable))
            else:
                self.require_space(NEW_SHARD_BYTES)  # refused before anything exists
                config = _config(q, dim, self.settings(name), self.views(name))
                with _quiet_engine():
                    shard = q.EdgeShard.create(str(path), config)
        except BaseException as exc:  # the engine raises bare Exception, or panics
            if not _engine_failure(exc):
                raise
            if isinstance(exc, StoreError):
                raise
            raise _engine_error(exc, self.root, name) from None
        self._shards[physical] = shard
        return shard

    def _openable(self, name: str, path: Path) -> Path:
        """The shard directory to open: the store's own, or, for a reader, a private copy when the
        store cannot be written (a read-only mount, a published store) or its disk is full, since the
        engine writes to its files even to open them (on a full disk: SIGBUS). Holes stay holes: the
        engine's 32 MB mmap files are mostly empty."""
        if self.write or (os.access(path, os.W_OK) and
                          shutil.disk_usage(path).free >= _fill_bytes(path) + MARGIN_BYTES):
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
            with _quiet_engine():
                return call(shard)
        except BaseException as exc:
            if not _engine_failure(exc):
                raise
            raise _engine_error(exc, self.root, name) from None

    # -- points ------------------------------------------------------------------------------
    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        q = _engine()
        vectors = np.asarray(vectors, dtype=np.float32)
        self.require_space(write_bytes(len(ids), vectors.nbytes))
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
            request = q.ScrollRequest(offset=offset, limit=VECTOR_PAGE if vectors else PAGE,
                                      with_payload=fields if fields else True, with_vector=vectors)
            page, offset = self._run(name, lambda shard: shard.scroll(request))
            for rec in page:
                yield Record(str(rec.id), rec.payload or {}, _as_array(rec.vector) if vectors else None)
            if offset is None:
                return

    def retrieve(self, name: str, ids: list[str], *, vectors: bool = False) -> list[Record]:
        found = self._run(name, lambda shard: shard.retrieve(list(ids), with_payload=True, with_vector=vectors))
        by_id = {str(r.id): Record(str(r.id), r.payload or {}, _as_array(r.vector) if vectors else None) for r in found}
        return [by_id[i] for i in ids if i in by_id]

    def search(self, name: str, queries: np.ndarray, k: int, *, label: str | None = None,
               params: SearchSettings = SearchSettings()) -> list[list[Hit]]:
        q = _engine()
        flt = None
        if label is not None:
            flt = q.Filter(must=[q.FieldCondition(key="class", match=q.MatchValue(label))])
        search_params = q.SearchParams(hnsw_ef=params.hnsw_ef, quantization=q.QuantizationSearchParams(
            rescore=params.rescore, oversampling=params.oversampling))
        queries = np.asarray(queries, dtype=np.float32)
        requests = [
            q.QueryRequest(limit=k, query=q.Query.Nearest(vec), with_payload=True, filter=flt, params=search_params)
            for vec in queries.tolist()
        ]
        answers = self._run(name, lambda shard: shard.query_batch(q.QueryBatchRequest(requests)))
        return [[Hit(str(p.id), multi_score(float(p.score), queries), p.payload or {}) for p in points]
                for points in answers]

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
                    with _quiet_engine():
                        step()
                except BaseException as exc:
                    if not _engine_failure(exc):
                        raise
                    error = error or _engine_error(exc, self.root, name)
        self._shards.clear()
        for scratch in self._copies.values():
            shutil.rmtree(scratch, ignore_errors=True)
        self._copies.clear()
        if error is not None:
            raise error


#: mutable_id_tracker.mappings entries (Qdrant's MappingChangeType byte -> entry bytes): insert a
#: number / UUID id (+ a u32 internal id), delete a number / UUID id.
MAPPING_ENTRY = {1: 13, 2: 21, 3: 9, 4: 17}
INSERT_UUID = np.dtype([("kind", "u1"), ("uuid", "V16"), ("internal", "<u4")])


def _check_segments(name: str, shard: Path) -> None:
    """Refuse, in one line naming the file, segment files the engine cannot survive reading: it aborts
    the process on an internal id far past the segment's points (a garbled id tracker: "memory
    allocation of 92 GB failed", exit 134) and panics on an emptied or cut vector status file."""
    for segment in sorted((shard / "segments").glob("*")):
        for status in segment.glob("vector_storage/*/status.dat"):
            if status.stat().st_size < 8:
                raise _damaged(name, status, f"{status.stat().st_size} of its 8 bytes")
        mappings = segment / "mutable_id_tracker.mappings"
        if mappings.is_file():
            why = _mappings_damage(mappings.read_bytes(), (segment / "mutable_id_tracker.versions"))
            if why:
                raise _damaged(name, mappings, why)


def _damaged(name: str, path: Path, why: str) -> StoreError:
    return StoreError(f"collection {name} is damaged: {path} {why}: `m3d check --repair` sets it aside and "
                      "`m3d sync` embeds it again")


def _mappings_damage(data: bytes, versions: Path) -> str | None:
    """Why an id tracker's mappings cannot be right, or None. Internal ids are handed out in order, one
    per inserted point, so none can reach past the inserts recorded (plus the versions the tracker
    holds, generously); a trailing half entry is a crash while flushing, which the engine cuts itself."""
    if len(data) % INSERT_UUID.itemsize == 0 and (kinds := np.frombuffer(data, np.uint8)[::INSERT_UUID.itemsize]).size \
            and (kinds == 2).all():  # only UUID inserts, m3d's usual file: checked at numpy speed
        internal = np.frombuffer(data, INSERT_UUID)["internal"]
        inserts, highest = len(internal), int(internal.max())
    else:
        inserts, highest, at = 0, -1, 0
        while at < len(data):
            size = MAPPING_ENTRY.get(data[at])
            if size is None:
                return f"holds an entry of unknown kind {data[at]:#04x} at byte {at}"
            if at + size > len(data):
                break
            if data[at] in (1, 2):
                inserts += 1
                highest = max(highest, int.from_bytes(data[at + size - 4:at + size], "little"))
            at += size
    known = versions.stat().st_size // 8 if versions.is_file() else 0
    if highest >= 2 * (inserts + known) + 1024:
        return f"names internal id {highest} for a segment of {inserts} inserted points"
    return None


def _fill_bytes(shard: Path) -> int:
    """What opening a shard for writing may allocate: the holes of its vector chunks and payload
    indexes, which the engine fills as it opens them (measured on tmpfs; its WAL and payload pages
    fill only as points are written, which write_bytes counts)."""
    holes = 0
    for folder, dirs, files in os.walk(shard):
        dirs[:] = [d for d in dirs if d not in ("wal", "payload_storage")]
        if "vector_storage" not in folder and "payload_index" not in folder:
            continue
        for name in files:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            holes += max(0, st.st_size - st.st_blocks * 512)
    return holes


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


def _threshold_points(kb: int, dim: int) -> int | None:
    """IndexSettings.index_threshold back from the engine's KB of vectors: the fewest points that fill
    it (1 KB is what a threshold of 0, "always", is written as)."""
    if not kb:
        return None
    return 0 if kb == 1 else (kb - 1) * 1024 // (4 * dim) + 1


def _config(q, dim: int, settings: IndexSettings, views: int | None = None):
    """The shard's configuration from m3d's settings (the engine's thresholds are in KB of vectors);
    a multivector collection (views per point) compares its points by MaxSim."""
    kb = settings.threshold_kb(dim * (views or 1))
    quantization = {
        "none": None,
        "int8": lambda: q.ScalarQuantizationConfig(type=q.ScalarType.Int8, quantile=0.99, always_ram=True),
        "binary": lambda: q.BinaryQuantizationConfig(always_ram=True),
    }[settings.quantization]
    return q.EdgeConfig(
        vectors=q.EdgeVectorParams(size=dim, distance=q.Distance.Cosine, on_disk=settings.on_disk,
                                   multivector_config=q.MultiVectorConfig(comparator=q.MultiVectorComparator.MaxSim)
                                   if views is not None else None),
        hnsw_config=q.HnswIndexConfig(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct,
                                      full_scan_threshold=kb),
        quantization_config=quantization() if quantization else None,
        optimizers=q.EdgeOptimizersConfig(indexing_threshold=kb),
    )


def _as_array(vector) -> np.ndarray:
    if isinstance(vector, dict):  # named vectors: ours is the default, unnamed one
        vector = vector.get("", next(iter(vector.values())))
    return np.asarray(vector, dtype=np.float32)
