"""The staged, overlapped sync: discover -> plan -> (load + render in workers) -> encode -> pool -> write.

    files --plan--> todo --[worker processes: load, hash, render]--> rendered views (bounded queue)
          --[main thread: encode every encoder on batches spanning many objects, pool every pool]-->
          --[writer thread: batched upserts per collection]--> Qdrant --(after the run)--> FAISS

Qdrant is the record of what is done: each point carries its file's content hash and the pipeline
fingerprint, so a re-run (after a crash, an edit, a new file) plans only the missing work and the
result is the same as one uninterrupted run. FAISS is rebuilt from Qdrant at the end.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .dataset import MeshFile, bytes_hash, content_hash, dataset_identity, discover
from .errors import M3DError, StoreError
from .meshio import DEFAULT_MAX_FACES, load_mesh
from .orientation import pose
from .render import BACKGROUND, ViewSettings, create_renderer, posed
from .schemas import SYNC_FIELDS, Fingerprint, collection_name, object_payload
from .store import Session, is_unit

log = logging.getLogger("m3d")

DEFAULT_ENCODERS = ("clip", "dinov2")
DEFAULT_POOLS = ("mean", "max", "attn")
WRITE_BATCH = 512

#: Exit statuses of `m3d sync` (documented in the README).
EXIT_OK, EXIT_SKIPPED = 0, 4


@dataclass(frozen=True)
class SyncOptions:
    encoders: tuple[str, ...] = DEFAULT_ENCODERS
    pools: tuple[str, ...] = DEFAULT_POOLS
    view: ViewSettings = ViewSettings()  # cameras, renderer, up axis, layout, pose alignment
    workers: int | None = None  # render processes; 0 renders in this process; None = auto
    batch_size: int | None = None  # images per encoder call; None = the encoder's own choice
    device: str | None = None
    precision: str | None = None
    max_faces: int = DEFAULT_MAX_FACES
    rebuild: bool = False  # drop collections whose fingerprint differs instead of refusing


@dataclass
class Rendered:
    """What the render stage hands the encoders for one object (or why it could not)."""

    file: MeshFile
    views: np.ndarray | None = None  # (views, H, W, 3) uint8
    reason: str | None = None
    bad_input: bool = False  # the file itself is unusable (not a passing I/O or library failure)
    content_hash: str = ""
    file_size: int = 0
    mtime_ns: int = 0
    vertices: int = 0
    faces: int = 0
    pose: dict | None = None  # the rotation it was rendered with (orientation.Pose.to_payload)
    seconds: float = 0.0


@dataclass
class StageStats:
    """Busy seconds per stage; the bottleneck is the busiest one."""

    render: float = 0.0  # summed over the render workers
    encode: float = 0.0
    write: float = 0.0
    render_workers: int = 1  # render processes sharing the render seconds (0 counts as 1: in-process)

    def bottleneck(self) -> str:
        """The stage with the most busy time per thread of work: the workers render in parallel, so
        their summed seconds are split over them (else 15 half-idle workers would outvote a busy GPU)."""
        busy = {"render": self.render / max(self.render_workers, 1), "encode": self.encode, "write": self.write}
        return max(busy, key=busy.get)


@dataclass
class SyncReport:
    root: str
    dataset: str
    collections: list[str]
    discovered: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    objects_per_s: float = 0.0
    stages: StageStats = field(default_factory=StageStats)
    workers: int = 0
    exit_status: int = EXIT_OK

    def summary(self) -> dict:
        data = asdict(self)
        data["skipped"] = len(self.skipped)
        return data


Progress = Callable[[int, int, SyncReport], None]  # (done, total, report so far)


# -- render stage (runs in worker processes) -------------------------------------------------
_worker_renderer = None
_worker_view = ViewSettings()
_worker_max_faces = DEFAULT_MAX_FACES


def _init_render_worker(view: ViewSettings, max_faces: int) -> None:
    """One renderer (one GL context) per worker process, created once."""
    global _worker_renderer, _worker_view, _worker_max_faces
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker_renderer = create_renderer(view)
    _worker_view = view
    _worker_max_faces = max_faces


def _render_one(file: MeshFile) -> Rendered:
    """Load, hash and render one file; every failure becomes a reason, never an exception."""
    start = time.perf_counter()
    result = Rendered(file)
    try:
        # stat before reading: a file edited in between then looks changed next time, never fresh
        stat = file.path.stat()
        result.file_size, result.mtime_ns = stat.st_size, stat.st_mtime_ns
        read: dict[str, str] = {}  # the OFF reader hands over the bytes it read: hash them, no second read
        mesh = load_mesh(file.path, max_faces=_worker_max_faces,
                         on_bytes=lambda data: read.setdefault("hash", bytes_hash(data)))
        result.content_hash = read.get("hash") or content_hash(file.path)
        result.vertices, result.faces = len(mesh.vertices), len(mesh.faces)
        placed = pose(mesh, _worker_view)
        result.pose = placed.to_payload()
        views = _worker_renderer.render(posed(mesh, placed.rotation))
        # a blank view is all background (coverage == 0); min over each view is ~20x cheaper than coverage()
        blank = int((views.reshape(len(views), -1).min(axis=1) == BACKGROUND).sum())
        if blank:
            result.reason, result.bad_input = f"blank render in {blank} of {len(views)} views", True
        else:
            result.views = views
    except M3DError as exc:
        result.reason, result.bad_input = str(exc), True
    except OSError as exc:
        result.reason = f"unreadable: {exc.strerror or exc}"
    except Exception as exc:  # a bug or a library failure on one file must not stop the sync
        result.reason = f"internal error: {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def auto_workers(encode_on_cpu: bool = False) -> int:
    """Render processes. Encoders on a GPU: every core but one (which feeds the GPU). Encoders on the
    CPU: every core, since rendering and encoding share the cores anyway and the bounded window stops
    the renderers whenever encoding is the slower stage (measured: 2 workers render ~1.5x faster than 1
    on a 2-core machine, and the weight-free sync is render-bound)."""
    cores = os.cpu_count() or 2
    return max(1, min(cores if encode_on_cpu else cores - 1, 16))


def render_stream(files: list[MeshFile], options: SyncOptions, workers: int,
                  window: int | None = None) -> Iterator[Rendered]:
    """Rendered objects in completion order, with at most `window` objects in flight (flat memory).

    The window should cover one encode batch plus a little: while the caller encodes a batch, the
    workers keep rendering the next one instead of idling."""
    if workers == 0:
        _init_render_worker(options.view, options.max_faces)
        try:
            for file in files:
                yield _render_one(file)
        finally:
            _worker_renderer.close()
        return
    window = max(window or 0, 4 * workers)
    queued = deque(files)
    suspects: deque[MeshFile] = deque()  # in flight when a worker died: retried one at a time
    while queued or suspects:
        with ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),  # GL contexts do not survive fork
            initializer=_init_render_worker, initargs=(options.view, options.max_faces),
        ) as pool:
            pending: dict[Future, MeshFile] = {}
            crashed: list[MeshFile] = []
            isolated = False  # a suspect is in flight, alone
            while (queued or suspects or pending) and not crashed:
                if not pending:
                    isolated = bool(suspects)
                while len(pending) < (1 if isolated else window) and (suspects or queued):
                    file = (suspects or queued).popleft()
                    pending[pool.submit(_render_one, file)] = file
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    file = pending.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        crashed.append(file)
                        continue
                    yield result
            if crashed:  # the pool is gone; which file killed it is known only when it was alone
                crashed.extend(pending.values())
                if isolated and len(crashed) == 1:
                    yield Rendered(crashed[0], reason="the renderer crashed on this file (worker process died)")
                else:
                    log.warning("a render worker died; retrying its %d files one at a time", len(crashed))
                    suspects.extend(crashed)


# -- plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    todo: list[MeshFile]  # files to (re-)embed
    needs: dict[str, set[str]]  # rel_path -> encoders it needs
    changed: set[str]  # rel_paths of todo files stored before with other content
    remove: list[str]  # point ids to delete from every collection
    added: int = 0
    updated: int = 0
    unchanged: int = 0


def plan_sync(files: list[MeshFile], known: dict[str, dict[str, dict]], encoder_of: dict[str, str],
              pipelines: dict[str, Fingerprint], dataset: str, prune: bool) -> Plan:
    """Compare the files with what each collection holds (id -> payload) and list the work: a point
    is fresh when its file's content and its pipeline fingerprint both match."""
    plan = Plan([], {}, set(), [])
    present = {f.point_id for f in files}
    hash_cache: dict[str, str] = {}
    for file in files:
        pid = file.point_id
        missing: set[str] = set()
        changed = False
        for name, records in known.items():
            record = records.get(pid)
            if record is None or not pipelines[name].matches(record.get("pipeline")):
                missing.add(encoder_of[name])
            elif not _same_content(file, record, hash_cache):
                missing.add(encoder_of[name])
                changed = True
        if not missing:
            plan.unchanged += 1
            continue
        plan.todo.append(file)
        plan.needs[file.rel_path] = missing
        if changed:
            plan.updated += 1
            plan.changed.add(file.rel_path)
        else:
            plan.added += 1
    if prune:
        stale = set()
        for records in known.values():
            stale |= {pid for pid, rec in records.items() if rec.get("dataset") == dataset and pid not in present}
        plan.remove = sorted(stale)
    return plan


def _same_content(file: MeshFile, record: dict, hash_cache: dict[str, str]) -> bool:
    """Unchanged when size and mtime match; otherwise when the content hash still matches."""
    try:
        stat = file.path.stat()
    except OSError:
        return False
    if record.get("file_size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return True
    if record.get("file_size") != stat.st_size:
        return False
    if file.rel_path not in hash_cache:
        try:
            hash_cache[file.rel_path] = content_hash(file.path)
        except OSError:
            return False
    return hash_cache[file.rel_path] == record.get("content_hash")


# -- write stage ------------------------------------------------------------------------------
class Writer(threading.Thread):
    """One thread that batches upserts per collection (no one-at-a-time upserts, no multiprocessing
    upload), so encoding never waits on the store and the store sees few, large writes."""

    def __init__(self, session: Session, stats: StageStats):
        super().__init__(name="m3d-writer", daemon=True)
        self.session = session
        self.stats = stats
        self.inbox: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self._buffers: dict[str, tuple[list, list, list]] = {}

    def put(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        if self.error is not None:
            raise self.error
        self.inbox.put((name, ids, vectors, payloads))

    def run(self) -> None:
        try:
            while True:
                item = self.inbox.get()
                if item is None:
                    break
                name, ids, vectors, payloads = item
                buf = self._buffers.setdefault(name, ([], [], []))
                buf[0].extend(ids)
                buf[1].append(vectors)
                buf[2].extend(payloads)
                if len(buf[0]) >= WRITE_BATCH or self.inbox.empty():  # write when full or idle
                    for pending in list(self._buffers):
                        self._flush(pending)
            for name in list(self._buffers):
                self._flush(name)
        except BaseException as exc:  # handed to the main thread, which stops the sync
            self.error = exc
            while self.inbox.get() is not None:  # drain so the producer never blocks forever
                pass

    def _flush(self, name: str) -> None:
        ids, vectors, payloads = self._buffers.pop(name)
        if ids:
            start = time.perf_counter()
            self.session.vectors.upsert(name, ids, np.concatenate(vectors), payloads)
            self.stats.write += time.perf_counter() - start
            log.info("upserted %d points into %s", len(ids), name)

    def finish(self) -> None:
        self.inbox.put(None)
        self.join()
        if self.error is not None:
            raise self.error


# -- the sync ---------------------------------------------------------------------------------
def sync(
    session: Session,
    root: Path,
    options: SyncOptions,
    *,
    classes: list[str] | None = None,
    split: str | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    dataset: str | None = None,
    progress: Progress | None = None,
) -> SyncReport:
    """Bring the store in step with the meshes under root, doing only the work that is missing."""
    from .encoders import load_encoder

    started = time.perf_counter()
    explicit = dataset is not None
    root, dataset = dataset_identity(root, dataset)
    files, skips = discover(root, classes=classes, split=split, per_class=per_class, limit=limit, dataset=dataset)
    moved_from = session.claim_root(dataset, root, explicit=explicit)
    if moved_from:
        log.warning("dataset %s moved: %s -> %s", dataset, moved_from, root)
    encoders = [load_encoder(spec, device=options.device, precision=options.precision,
                             batch_size=options.batch_size) for spec in options.encoders]
    targets: dict[str, tuple[object, str, Fingerprint]] = {}
    for spec, encoder in zip(options.encoders, encoders):
        for pool_name in options.pools:
            fp = Fingerprint(encoder=spec, model_id=encoder.model_id, pool=pool_name, view=options.view)
            targets[collection_name(encoder.name, pool_name)] = (encoder, pool_name, fp)
    report = SyncReport(str(root), dataset, sorted(targets), discovered=len(files))
    report.skipped = [asdict(s) for s in skips]

    known = _prepare_collections(session, targets, options.rebuild)
    encoder_of = {name: encoder.name for name, (encoder, _, _) in targets.items()}
    prune = not (classes or split or per_class or limit)
    pipelines = {name: fp for name, (_, _, fp) in targets.items()}
    plan = plan_sync(files, known, encoder_of, pipelines, dataset, prune)
    report.unchanged, report.added, report.updated = plan.unchanged, plan.added, plan.updated
    if plan.todo or plan.remove:
        for name in targets:
            session.mark_stale(name)
    for name in targets:
        session.vectors.delete(name, plan.remove)
    report.removed = len(plan.remove)
    log.info("plan: %d to embed (%d new, %d changed), %d unchanged, %d removed", len(plan.todo), plan.added,
             plan.updated, plan.unchanged, len(plan.remove))

    on_cpu = all(str(e.device).startswith("cpu") for e in encoders)
    workers = auto_workers(on_cpu) if options.workers is None else options.workers
    report.workers = report.stages.render_workers = workers
    by_encoder = _group_by_encoder(targets)
    writer = Writer(session, report.stages)
    writer.start()
    batch_images = max(e.batch_size for e in encoders)
    window = -(-batch_images // options.view.views) + 2 * workers  # the next batch renders during an encode
    unusable: list[str] = []  # stored from an earlier, readable version: the vector no longer describes the file
    done = embedded = 0
    render_started = time.perf_counter()
    try:
        batch: list[Rendered] = []
        batch_views = 0
        for item in render_stream(plan.todo, options, workers, window):
            report.stages.render += item.seconds
            if item.views is None:
                report.skipped.append({"rel_path": item.file.rel_path, "reason": item.reason})
                if item.file.rel_path in plan.changed:
                    report.updated -= 1
                    if item.bad_input:  # its content changed and is now unusable: the old vector goes
                        unusable.append(item.file.point_id)
                else:
                    report.added -= 1
                done += 1
            else:
                batch.append(item)
                batch_views += len(item.views)
            if batch_views >= batch_images:
                _encode_and_write(batch, by_encoder, plan, writer, report.stages)
                done, embedded, batch, batch_views = done + len(batch), embedded + len(batch), [], 0
            if progress:
                progress(done, len(plan.todo), report)
        if batch:
            _encode_and_write(batch, by_encoder, plan, writer, report.stages)
            done, embedded = done + len(batch), embedded + len(batch)
        writer.finish()
    except BaseException:
        writer.inbox.put(None)
        writer.join()  # never leave the writer using a store the caller is about to close
        raise
    elapsed = time.perf_counter() - render_started
    if progress:
        progress(done, len(plan.todo), report)
    for name in targets:
        session.vectors.delete(name, unusable)
    session.vectors.flush()
    for name in targets:
        index = session.refresh_exact(name, known_ids=None if (plan.todo or plan.remove) else list(known[name]))
        log.info("faiss index of %s holds %d points", name, len(index.ids))
    report.seconds = time.perf_counter() - started
    report.objects_per_s = embedded / elapsed if embedded and elapsed > 0 else 0.0
    report.exit_status = EXIT_SKIPPED if report.skipped else EXIT_OK
    session.write_report("last-sync.json", {**asdict(report)})
    return report


def _prepare_collections(session: Session, targets: dict, rebuild: bool) -> dict[str, dict[str, dict]]:
    """Create missing collections; refuse (or, with rebuild, drop) ones made with other settings.
    Returns what each collection holds: point id -> the payload fields that decide freshness."""
    known: dict[str, dict[str, dict]] = {}
    existing = set(session.collections())
    for name, (encoder, _, fp) in targets.items():
        if name in existing:
            stored = session.fingerprint(name)
            dim_differs = session.vectors.dim(name) != encoder.dim
            if (stored is not None and stored != fp) or dim_differs:
                if not rebuild:
                    diff = "; ".join(fp.differences(stored)) if stored else f"dim {session.vectors.dim(name)} -> {encoder.dim}"
                    raise StoreError(f"collection {name} was built with other settings ({diff}); "
                                     "run again with --rebuild to replace it")
                session.drop(name)
        session.vectors.ensure_collection(name, encoder.dim)
        known[name] = {}
        for rec in session.vectors.records(name, fields=SYNC_FIELDS, vectors=True):
            if is_unit(rec.vector):
                known[name][rec.id] = rec.payload
            else:  # every stored vector is unit length; anything else is damage: embed it again
                log.warning("%s: point %s (%s) has a damaged vector; it will be embedded again",
                            name, rec.id, rec.payload.get("path"))
    return known


def _group_by_encoder(targets: dict) -> dict[str, tuple[object, list[tuple[str, str, Fingerprint]]]]:
    """encoder name -> (encoder, [(collection, pool, fingerprint), ...]): each encoder runs once per batch."""
    by_encoder: dict[str, tuple[object, list[tuple[str, str, Fingerprint]]]] = {}
    for name, (encoder, pool_name, fp) in targets.items():
        by_encoder.setdefault(encoder.name, (encoder, []))[1].append((name, pool_name, fp))
    return by_encoder


def _encode_and_write(batch: list[Rendered], by_encoder: dict, plan: Plan, writer: Writer, stats: StageStats) -> None:
    """Encode every view of the batch once per encoder, pool once per pool, hand rows to the writer."""
    import torch

    from .pooling import pool

    start = time.perf_counter()
    out = []
    for enc_name, (encoder, collections) in by_encoder.items():
        members = [b for b in batch if enc_name in plan.needs[b.file.rel_path]]
        if not members:
            continue
        views_per = members[0].views.shape[0]
        images = np.concatenate([b.views for b in members])
        chunks = [encoder.encode(images[i:i + encoder.batch_size]) for i in range(0, len(images), encoder.batch_size)]
        per_view = torch.cat(chunks).reshape(len(members), views_per, -1)
        for name, pool_name, fp in collections:
            vectors = pool(pool_name, per_view).cpu().numpy()
            payloads = [
                object_payload(rel_path=b.file.rel_path, label=b.file.label, split=b.file.split, dataset=b.file.dataset,
                               content_hash=b.content_hash, file_size=b.file_size, mtime_ns=b.mtime_ns,
                               vertices=b.vertices, faces=b.faces, fingerprint=fp, pose=b.pose)
                for b in members
            ]
            out.append((name, [b.file.point_id for b in members], vectors, payloads))
    stats.encode += time.perf_counter() - start
    for item in out:
        writer.put(*item)
