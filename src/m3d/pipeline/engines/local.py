"""The local engine: render worker processes, encoding in the calling thread, the writer thread.

    plan.tasks --[render processes: render(task, context)]--> Rendered (at most `window` in flight)
               --[this thread: embed(batch spanning many objects)]--> Points --[writer thread]--> store

Each render process builds one RenderContext (one GL context) at start and renders the tasks it is
sent over its own socket, so the engine knows which tasks were on a worker that died: they are retried,
each alone on a worker, and a task that kills its worker while alone is skipped with a reason. A render
process dies with the sync in any state, start-up included (m3d.children).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Iterator

from ... import children
from ...errors import M3DError
from ..plan import RenderSpec, Task
from ..stages import RenderContext, Rendered, embed, render, write
from . import Job, dispatch, worker_died


def auto_workers(encode_on_cpu: bool = False) -> int:
    """Render processes. Encoders on a GPU: every core but one (which feeds the GPU). Encoders on the
    CPU: every core, since rendering and encoding share the cores anyway and the bounded window stops
    the renderers whenever encoding is the slower stage (measured: 2 workers render ~1.5x faster than 1
    on a 2-core machine, and the weight-free sync is render-bound)."""
    cores = os.cpu_count() or 2
    return max(1, min(cores if encode_on_cpu else cores - 1, 16))


def run(job: Job) -> None:
    """Render in worker processes, embed batches spanning many objects here, write in the writer thread."""
    options, stats, tally = job.options, job.stats, job.tally
    encoders = [encoder for encoder, _ in job.encoders.values()]
    on_cpu = all(str(e.device).startswith("cpu") for e in encoders)
    workers = auto_workers(on_cpu) if options.workers is None else options.workers
    tally.report.workers = stats.render_workers = workers
    tally.report.resources = {"cpus": os.cpu_count() or 1, "gpus": 0 if on_cpu else 1, "nodes": 1,
                              "render_workers": workers, "encode_workers": 1}
    batch_images = max(e.batch_size for e in encoders)
    window = -(-batch_images // job.plan.render.view.views) + 2 * workers  # the next batch renders during an encode
    batch: list[Rendered] = []
    batch_views = 0
    for item in render_stream(job.plan.tasks, job.plan.render, workers, window):
        stats.render += item.seconds
        if item.views is None:
            tally.skipped(item)
        else:
            batch.append(item)
            batch_views += len(item.views)
        if batch_views >= batch_images:
            _embed_and_write(batch, job)
            batch, batch_views = [], 0
        tally.tick()
    if batch:
        _embed_and_write(batch, job)


def _embed_and_write(batch: list[Rendered], job: Job) -> None:
    start = time.perf_counter()
    points = embed(batch, job.encoders)
    job.stats.encode += time.perf_counter() - start
    write(points, job.writer)
    job.tally.embedded_batch(len(batch))


def render_stream(tasks: list[Task], spec: RenderSpec, workers: int, window: int | None = None) -> Iterator[Rendered]:
    """Rendered tasks in completion order, with at most `window` tasks in flight (flat memory).

    The window should cover one encode batch plus a little: while the caller encodes a batch, the
    workers keep rendering the next one instead of idling. workers=0 renders in this process."""
    if not tasks:
        return
    if workers == 0:
        context = RenderContext(spec, worker=False)
        try:
            for task in tasks:
                yield render(task, context)
        finally:
            context.close()
        return
    pool = _RenderPool(spec, workers)
    try:
        yield from pool.stream(tasks, max(window or 0, 4 * workers))
    finally:
        pool.close()


def serve(conn: Connection) -> None:
    """A render process (m3d.children): build the context once, then render each task it is sent until
    told to stop or until its parent is gone (the socket closes). A sender thread writes results while
    the next task renders, so a worker never waits for the parent to read."""
    try:
        context = RenderContext(conn.recv())
    except (EOFError, OSError):  # the parent is gone
        return
    except Exception as exc:  # no renderer on this machine: the parent stops the sync with this line
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    outbox: queue.Queue = queue.Queue()
    sender = threading.Thread(target=_send_all, args=(outbox, conn), daemon=True)
    sender.start()
    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if task is None:
                break
            outbox.put(render(task, context))
    finally:
        outbox.put(None)
        sender.join()
        context.close()


def _send_all(outbox: queue.Queue, conn: Connection) -> None:
    while (item := outbox.get()) is not None:
        try:
            conn.send(item)
        except OSError:  # the parent is gone
            return


class _Worker:
    """One render process, its socket, and the tasks sent to it and not yet answered (in order)."""

    def __init__(self, spec: RenderSpec):
        self.process, self.conn = children.start("m3d.pipeline.engines.local:serve")
        self.gone = False  # its socket closed: the process has ended or is ending
        self.in_flight: deque[Task] = deque()
        self.isolated = False  # running one suspect alone: if it dies now, that task killed it
        try:
            self.conn.send(spec)
        except OSError:
            self.gone = True

    def alive(self) -> bool:
        return not self.gone and self.process.poll() is None

    def send(self, task: Task) -> None:
        self.in_flight.append(task)  # first: a task sent to a dying worker is retried, never lost
        try:
            self.conn.send(task)
        except OSError:
            self.gone = True  # the worker died; its tasks are retried

    def receive(self) -> Iterator[Rendered]:
        """Results that have arrived, without blocking."""
        while not self.gone:
            try:
                if not self.conn.poll():
                    return
                item = self.conn.recv()
            except (EOFError, OSError):
                self.gone = True
                return
            if isinstance(item, str):
                raise M3DError(f"render worker could not start: {item}")
            self.in_flight.popleft()
            if not self.in_flight:
                self.isolated = False
            yield item

    def stop(self, clean: bool) -> None:
        children.stop(self.process, self.conn, clean=clean)


class _RenderPool:
    def __init__(self, spec: RenderSpec, workers: int):
        self.spec = spec
        self.workers = [_Worker(spec) for _ in range(workers)]

    def stream(self, tasks: list[Task], window: int) -> Iterator[Rendered]:
        queued = deque(tasks)
        suspects: deque[Task] = deque()  # in flight on a worker that died: retried one at a time
        while queued or suspects or any(w.in_flight for w in self.workers):
            dispatch(self.workers, queued, suspects, window, 0, _Worker.send)
            wait([w.conn for w in self.workers])  # a result, or the end of the socket of a worker that died
            for i, worker in enumerate(self.workers):
                yield from worker.receive()
                if worker.alive():
                    continue
                yield from worker.receive()  # whatever it sent before it died
                skip = worker_died(worker, list(worker.in_flight), suspects)
                if skip is not None:
                    yield skip
                worker.stop(clean=False)
                self.workers[i] = _Worker(self.spec)

    def close(self) -> None:
        clean = not any(w.in_flight for w in self.workers)
        for worker in self.workers:
            worker.stop(clean)
