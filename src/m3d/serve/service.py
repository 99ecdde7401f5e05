"""The server's library side, with no HTTP in it: searches through one warm ``Searcher``, objects and
their pictures, and the syncs handed to the server, each run as a job beside the searches.

A job runs the ordinary ``pipeline.sync`` on the server's own session: every write it makes takes the
write side of the session's guard (one batch of points, a FAISS change, an index build), and every
search takes the read side, so searching goes on through a sync and sees each collection as it was
before a write or after it.
"""

from __future__ import annotations

import base64
import itertools
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..connector import Hit, IndexSettings, SearchSettings
from ..errors import M3DError, NotFoundError, StoreError, UsageError
from ..schemas import INDEXED_KEYWORDS
from ..search import Query, QueryResult, Searcher
from ..store import Session
from .options import ServeOptions
from .thumbnails import Thumbnails, png

log = logging.getLogger("m3d")

#: Fields of a handed-over sync request besides root, qdrant_url and the SyncOptions (sync()'s keywords).
SYNC_SELECTION = ("classes", "split", "per_class", "limit", "dataset")


@dataclass
class SyncJob:
    """One sync run by the server: its request, progress and outcome, as the API shows it."""

    id: int
    root: str
    engine: str
    state: str = "queued"  # queued | running | done | failed
    done: int = 0
    total: int | None = None
    bottleneck: str | None = None
    stages: dict = field(default_factory=dict)  # asdict(StageStats) so far: busy seconds per stage
    started: float = field(default_factory=time.time)
    finished: float | None = None
    report: dict | None = None  # asdict(SyncReport) once done
    error: str | None = None
    exit_code: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


class Service:
    def __init__(self, session: Session, options: ServeOptions, *, checkpoint: Path | None = None,
                 device: str | None = None, qdrant_url: str | None = None):
        """qdrant_url: the Qdrant server behind the store (None: the embedded one); a handed-over sync
        must name the same one, or it would write elsewhere than its user asked."""
        self.session = session
        self.options = options
        self.qdrant_url = qdrant_url
        self.searcher = Searcher(session, checkpoint=checkpoint, device=device, max_faces=options.max_faces,
                                 uploads=True)
        self.thumbnails = Thumbnails(self.searcher, session.store_dir / "thumbnails")
        self.jobs: dict[int, SyncJob] = {}
        self._ids = itertools.count(1)
        self._job_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.after_job = lambda: None  # the runner's: a job may have taken over the process's signals

    # -- start and stop ---------------------------------------------------------------------------
    def warm(self) -> None:
        """Before the first request: every collection opened, its FAISS index checked (or rebuilt) and
        its encoder loaded, so no query pays for a first use."""
        for name in self.session.collections():
            self.session.exact(name)
            with self.session.guard.reading():
                fp = self.searcher.state(name).fingerprint
            if fp is not None:
                try:
                    self.searcher.encoder(fp)
                except M3DError as exc:  # say it now; its queries say it again
                    log.warning("%s: its encoder cannot be loaded here: %s", name, exc)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.searcher.close()

    # -- reads ------------------------------------------------------------------------------------
    def collection_names(self) -> list[str]:
        return self.session.collections()

    def require(self, name: str) -> None:
        if name not in self.session.collections():
            raise NotFoundError(f"no collection {name!r} here")

    def collections(self) -> list[dict]:
        rows = []
        with self.session.guard.reading():
            for name in self.session.collections():
                state = self.searcher.state(name)
                fp = state.fingerprint
                try:
                    text = self.searcher.can_text(name)
                except M3DError:
                    text = None  # cannot be told here (its checkpoint is not on this machine)
                rows.append({"name": name, "points": state.points, "classes": len(state.classes),
                             "encoder": fp.model_id if fp else None, "pool": fp.pool if fp else None,
                             "view": asdict(fp.view) if fp else None, "text": text,
                             "index": self.session.vectors.index_info(name).state})
        return rows

    def facets(self, name: str, key: str = "class") -> dict[str, int]:
        self.require(name)
        if key not in INDEXED_KEYWORDS:
            raise UsageError(f"facets are counted for {', '.join(INDEXED_KEYWORDS)}, not {key!r}")
        with self.session.guard.reading():
            if key == "class":
                return dict(self.searcher.state(name).classes)
            return self.session.vectors.facet(name, key)

    def health(self) -> dict:
        with self.session.guard.reading():
            names = self.session.collections()
            points = sum(self.searcher.state(n).points for n in names)
        running = next((j.to_json() for j in self.jobs.values() if j.state in ("queued", "running")), None)
        return {"status": "ok", "store": self.session.vectors.location, "collections": len(names),
                "points": points, "sync": running}

    def _record(self, name: str, object_id: str):
        try:
            uuid.UUID(object_id)
        except ValueError:
            raise NotFoundError(f"no object {object_id!r}: object ids are UUIDs") from None
        self.require(name)
        with self.session.guard.reading():
            found = self.session.vectors.retrieve(name, [object_id], vectors=True)
            fp = self.searcher.state(name).fingerprint
        if not found or fp is None:
            raise NotFoundError(f"no object {object_id} in {name}")
        return found[0], fp

    def object(self, name: str, object_id: str) -> dict:
        record, fp = self._record(name, object_id)
        try:
            count, problem = len(self.thumbnails.views(record.payload, fp)), None
        except (M3DError, OSError) as exc:
            count, problem = 0, str(exc)
        return {"id": record.id, "collection": name, "payload": record.payload,
                "views": [view_url(name, record.id, i) for i in range(count)], "views_problem": problem}

    def view_png(self, name: str, object_id: str, view: int) -> Path:
        record, fp = self._record(name, object_id)
        views = self.thumbnails.views(record.payload, fp)
        if not 0 <= view < len(views):
            raise NotFoundError(f"object {object_id} has views 0..{len(views) - 1}, not {view}")
        return views[view]

    # -- searches ---------------------------------------------------------------------------------
    def search(self, q: Query, *, collection: str | None, k: int, label: str | None, exact: bool,
               preview: bool = False) -> dict:
        self._check_k(k)
        if collection is not None:
            self.require(collection)
        start = time.perf_counter()
        result = self.searcher.search(q, collection=collection, k=k, label=label, exact=exact,
                                      params=SearchSettings())
        return self._answer(result, start, preview)

    def similar(self, name: str, object_id: str, *, k: int, label: str | None, exact: bool) -> dict:
        """More like this: the object's own stored vector as the query, the object itself left out."""
        self._check_k(k)
        start = time.perf_counter()
        record, fp = self._record(name, object_id)
        with self.session.guard.reading():
            if label is not None and label not in self.searcher.state(name).classes:
                raise UsageError(f"no class {label!r} in {name}")
        hits, engine = self.searcher.nearest(name, fp, np.asarray(record.vector, np.float32), k, label=label,
                                             exact=exact, exclude=record.id)
        return self._answer(QueryResult(name, engine, hits, None, "object"), start, False)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.options.max_k:
            raise UsageError(f"k must be in [1, {self.options.max_k}], got {k}")

    def _answer(self, result: QueryResult, start: float, preview: bool) -> dict:
        answer = {"collection": result.collection, "engine": result.engine, "kind": result.kind,
                  "hits": [hit_json(result.collection, rank, h) for rank, h in enumerate(result.hits, 1)],
                  "ms": round((time.perf_counter() - start) * 1000, 2)}
        if preview and result.views is not None:  # what was encoded: the query's first view
            answer["preview"] = "data:image/png;base64," + base64.b64encode(png(result.views[0])).decode()
        return answer

    # -- syncs handed over ------------------------------------------------------------------------
    def start_sync(self, request: dict) -> SyncJob:
        """Check a handed-over sync (the options as `m3d sync` parsed them) and run it as a job."""
        from ..pipeline import SyncOptions
        from ..render import ViewSettings

        if not isinstance(request, dict) or not isinstance(request.get("root"), str):
            raise UsageError("a sync request names its folder: {\"root\": \"/path/to/meshes\", ...}")
        if request.get("qdrant_url") != self.qdrant_url:
            raise UsageError(f"this server serves {self.session.vectors.location}, not "
                             f"{request.get('qdrant_url') or 'the embedded store'}: pass the same --qdrant-url as `m3d serve`")
        root = Path(request["root"])
        if not root.is_absolute():
            raise UsageError(f"the folder of a handed-over sync must be an absolute path, got {root}")
        raw = request.get("options") or {}
        known = {f.name for f in fields(SyncOptions)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UsageError(f"unknown sync option(s): {', '.join(unknown)}")
        try:
            values = dict(raw)
            for key in ("encoders", "pools"):
                if key in values:
                    values[key] = tuple(values[key])
            if "view" in values:
                values["view"] = ViewSettings(**values["view"])
            if "index" in values:
                values["index"] = IndexSettings(**values["index"])
            options = SyncOptions(**values)
        except TypeError as exc:
            raise UsageError(f"bad sync options: {exc}") from None
        selection = {k: request.get(k) for k in SYNC_SELECTION}
        with self._job_lock:
            busy = next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)
            if busy is not None:
                raise JobConflict(f"sync job {busy.id} ({busy.root}) is running: hand this one over when it ends")
            job = SyncJob(next(self._ids), str(root), options.engine)
            self.jobs[job.id] = job
            self._thread = threading.Thread(target=self._run, args=(job, root, options, selection),
                                            name=f"m3d-sync-{job.id}", daemon=True)
            self._thread.start()
        return job

    def _run(self, job: SyncJob, root: Path, options, selection: dict) -> None:
        from ..pipeline import sync

        def progress(done: int, total: int, report) -> None:
            job.done, job.total, job.bottleneck = done, total, report.stages.bottleneck()
            job.stages = asdict(report.stages)

        job.state = "running"
        try:
            report = sync(self.session, root, options, progress=progress, **selection)
            job.report = asdict(report)
            job.report["indexes"] = {n: self.session.vectors.index_info(n).state for n in report.collections}
            job.exit_code, job.state = report.exit_status, "done"
        except M3DError as exc:
            job.error, job.exit_code, job.state = str(exc), exc.exit_code, "failed"
        except Exception as exc:  # a bug in one job must not take the server down: say what it was
            log.exception("sync job %d failed", job.id)
            job.error, job.exit_code, job.state = f"internal error: {type(exc).__name__}: {exc}", 1, "failed"
        finally:
            job.finished = time.time()
            self.after_job()

    def job(self, job_id: int) -> SyncJob:
        if job_id not in self.jobs:
            raise NotFoundError(f"no sync job {job_id}")
        return self.jobs[job_id]


class JobConflict(StoreError):
    """A sync handed over while another one runs (HTTP 409): one writer at a time."""


def view_url(collection: str, object_id: str, view: int) -> str:
    return f"/api/collections/{collection}/objects/{object_id}/views/{view}.png"


def hit_json(collection: str, rank: int, hit: Hit) -> dict:
    p = hit.payload
    return {"rank": rank, "id": hit.id, "score": round(hit.score, 6), "class": p.get("class"),
            "path": p.get("path"), "dataset": p.get("dataset"), "split": p.get("split"),
            "thumbnail": view_url(collection, hit.id, 0)}
