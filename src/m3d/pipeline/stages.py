"""The stage functions both engines schedule: render(task) -> embed(batch) -> write(points).

They hold no module state: a render worker keeps its renderer in a RenderContext it creates once (one
GL context per worker process or actor), an encode worker its loaded encoders in the targets it is
given, the writer its store session. Per-item failures are data (a Rendered with a reason), never
exceptions, so one bad file cannot stop a sync on any engine.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dataset import MeshFile, bytes_hash, content_hash, file_stamp
from ..errors import M3DError
from ..meshio import load_mesh
from ..orientation import pose
from ..render import MIN_COVERAGE, coverage, create_renderer, posed, shown
from ..schemas import object_payload
from ..store import Session
from .plan import RenderSpec, Stored, Target, Task

log = logging.getLogger("m3d")

WRITE_BATCH = 512

#: Fault injection for the engine tests: a render worker process (never the caller's own process)
#: kills itself with SIGKILL, as a renderer crash or the OOM killer would, when handed this relative path.
CRASH_ENV = "M3D_TEST_CRASH_ON"


@dataclass
class StageStats:
    """Busy seconds per stage; the bottleneck is the busiest one."""

    render: float = 0.0  # summed over the render workers
    encode: float = 0.0
    write: float = 0.0
    render_workers: int = 1  # render processes sharing the render seconds (0 counts as 1: in-process)
    encode_workers: int = 1  # encode actors sharing the encode seconds (the Ray engine may run several)

    def bottleneck(self) -> str:
        """The stage with the most busy time per thread of work: the workers render in parallel, so
        their summed seconds are split over them (else 15 half-idle workers would outvote a busy GPU)."""
        busy = {"render": self.render / max(self.render_workers, 1),
                "encode": self.encode / max(self.encode_workers, 1), "write": self.write}
        return max(busy, key=busy.get) if any(busy.values()) else "none (nothing to embed)"


# -- render -----------------------------------------------------------------------------------
@dataclass
class Rendered:
    """What the render stage hands the encoders for one task (or why it could not)."""

    task: Task
    views: np.ndarray | None = None  # (views, H, W, 3) uint8
    reason: str | None = None
    bad_input: bool = False  # the file itself is unusable (not a passing I/O or library failure)
    content_hash: str = ""
    stamp: dict[str, int] = field(default_factory=dict)  # dataset.file_stamp, taken before the read
    vertices: int = 0
    faces: int = 0
    pose: dict | None = None  # the rotation it was rendered with (orientation.Pose.to_payload)
    seconds: float = 0.0

    @property
    def file(self) -> MeshFile:
        return self.task.file


class RenderContext:
    """A render worker's state, created once per worker process (or actor): its renderer, which owns
    the worker's one GL context. A GL context belongs to the thread that made it and does not survive
    a fork, so it is never shared, never created per task."""

    def __init__(self, spec: RenderSpec, *, worker: bool = True):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.spec = spec
        self.renderer = create_renderer(spec.view)
        self.crash_on = os.environ.get(CRASH_ENV) if worker else None

    def close(self) -> None:
        self.renderer.close()


def render(task: Task, context: RenderContext) -> Rendered:
    """Load, hash and render one file; every failure becomes a reason, never an exception."""
    start = time.perf_counter()
    if context.crash_on is not None and task.file.rel_path == context.crash_on:
        os.kill(os.getpid(), signal.SIGKILL)
    result = Rendered(task)
    try:
        # stat before reading: a file edited in between then looks changed next time, never fresh
        result.stamp = file_stamp(task.file.path)
        read: dict[str, str] = {}  # the OFF reader hands over the bytes it read: hash them, no second read
        mesh = load_mesh(task.file.path, max_faces=context.spec.max_faces,
                         on_bytes=lambda data: read.setdefault("hash", bytes_hash(data)))
        result.content_hash = read.get("hash") or content_hash(task.file.path)
        result.vertices, result.faces = len(mesh.vertices), len(mesh.faces)
        placed = task.up.pose(mesh) if task.up is not None else pose(mesh, context.spec.view, suffix=task.file.path.suffix)
        result.pose = placed.to_payload()
        views = context.renderer.render(posed(mesh, placed.rotation))
        # an object is kept when one view shows it; only the views that show it are pooled
        visible = shown(views)
        if not visible.any():
            result.reason, result.bad_input = (f"no view shows the object (largest coverage "
                                               f"{coverage(views).max():.2%} < {MIN_COVERAGE:.1%})"), True
        else:
            result.views = views if visible.all() else np.ascontiguousarray(views[visible])
    except M3DError as exc:
        result.reason, result.bad_input = str(exc), True
    except OSError as exc:
        result.reason = f"unreadable: {exc.strerror or exc}"
    except Exception as exc:  # a bug or a library failure on one file must not stop the sync
        result.reason = f"internal error: {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


# -- embed ------------------------------------------------------------------------------------
@dataclass
class Points:
    """Rows for one collection: what the write stage upserts."""

    collection: str
    ids: list[str]
    vectors: np.ndarray  # (n, dim) float32, unit rows; (n, views, dim) for a multivector pool
    payloads: list[dict]


def embed(batch: list[Rendered], encoders: dict[str, tuple[Any, list[Target]]]) -> list[Points]:
    """Encode every view of the batch once per encoder (only the objects that need it), pool once per
    pool. `encoders` is plan.group_by_encoder(targets): encoder name -> (encoder, its targets)."""
    import torch

    from ..pooling import MULTIVECTOR, pool

    out = []
    for enc_name, (encoder, targets) in encoders.items():
        members = [b for b in batch if enc_name in b.task.needs]
        if not members:
            continue
        images = np.concatenate([b.views for b in members])
        chunks = [encoder.encode(images[i:i + encoder.batch_size]) for i in range(0, len(images), encoder.batch_size)]
        flat = torch.cat(chunks)
        counts = [len(b.views) for b in members]  # objects with views nobody sees pool fewer views
        starts = np.cumsum([0] + counts)
        groups: dict[int, list[int]] = {}
        for i, count in enumerate(counts):
            groups.setdefault(count, []).append(i)
        for target in targets:
            slots = target.fingerprint.view.views if target.pool in MULTIVECTOR else None
            vectors = np.empty((len(members), *([slots] if slots else []), target.dim), dtype=np.float32)
            for count, rows in groups.items():
                per_view = torch.stack([flat[starts[i]:starts[i] + count] for i in rows])
                vectors[rows] = pool(target.pool, per_view, slots).cpu().numpy()
            payloads = [
                object_payload(rel_path=b.file.rel_path, label=b.file.label, split=b.file.split, dataset=b.file.dataset,
                               content_hash=b.content_hash, stamp=b.stamp,
                               vertices=b.vertices, faces=b.faces, fingerprint=target.fingerprint,
                               pose=b.pose, views_shown=len(b.views))
                for b in members
            ]
            out.append(Points(target.collection, [b.task.id for b in members], vectors, payloads))
    return out


# -- write ------------------------------------------------------------------------------------
class Writer(threading.Thread):
    """One thread that batches upserts per collection (no one-at-a-time upserts, no multiprocessing
    upload), so encoding never waits on the store and the store sees few, large writes."""

    def __init__(self, session: Session, stats: StageStats, routes: dict[str, str] | None = None):
        """routes: collection -> the new version its rows go to while a rebuild fills it."""
        super().__init__(name="m3d-writer", daemon=True)
        self.session = session
        self.stats = stats
        self.routes = routes or {}
        self.inbox: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self._buffers: dict[str, tuple[list, list, list]] = {}
        # collection -> id -> what the sync manifest keeps of each point written (one copy per distinct value)
        self.written: dict[str, dict[str, Stored]] = {}
        self._shared: dict[Stored, Stored] = {}

    def put(self, points: Points) -> None:
        if self.error is not None:
            raise self.error
        self.inbox.put(points)

    def run(self) -> None:
        stopped = False  # the producer's None was taken: nothing more will come to drain
        try:
            while True:
                item = self.inbox.get()
                if item is None:
                    stopped = True
                    break
                buf = self._buffers.setdefault(item.collection, ([], [], []))
                buf[0].extend(item.ids)
                buf[1].append(item.vectors)
                buf[2].extend(item.payloads)
                if len(buf[0]) >= WRITE_BATCH or self.inbox.empty():  # write when full or idle
                    for pending in list(self._buffers):
                        self._flush(pending)
            for name in list(self._buffers):
                self._flush(name)
        except BaseException as exc:  # handed to the main thread, which stops the sync
            self.error = exc
            while not stopped and self.inbox.get() is not None:  # drain so the producer never blocks
                pass

    def _flush(self, name: str) -> None:
        ids, vectors, payloads = self._buffers.pop(name)
        if ids:
            start = time.perf_counter()
            self.session.upsert(self.routes.get(name, name), ids, np.concatenate(vectors), payloads)
            rows = self.written.setdefault(name, {})
            for pid, payload in zip(ids, payloads):
                stored = Stored.written(payload)
                rows[pid] = self._shared.setdefault(stored, stored)
            self.stats.write += time.perf_counter() - start
            log.info("upserted %d points into %s", len(ids), name)

    def finish(self) -> None:
        self.inbox.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop without raising: never leave the writer using a store the caller is about to close."""
        self.inbox.put(None)
        self.join()


def write(points: list[Points], writer: Writer) -> None:
    """Hand rows to the writer thread (it batches them per collection)."""
    for item in points:
        writer.put(item)
