"""The Ray engine: the same stage functions, scheduled over a Ray cluster (or a local Ray).

    driver: plan.tasks --> RenderActor.render(task)   CPU actors, num_cpus=1, one RenderContext
                                                      (one GL context) each, created once
            views stay in the object store --> EncodeActor.embed(batch)   one per GPU (num_gpus=1),
                                                      else one on the CPU; batches of a fixed size
            Points (pooled vectors + payloads) back to the driver --> the Writer --> the user's store

Plain actors rather than Ray Data: the driver has to know which tasks were on an actor that died, so
it can retry them alone and skip only the one that kills its actor while alone. Ray Data retries a
block and, once it runs out of retries, fails the dataset or drops the block without saying which row
did it. The driver limits how many objects are in flight (rendering, waiting for a batch, encoding),
which is the backpressure between the stages and keeps the object store small.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import M3DError, UsageError
from ..options import SyncOptions
from ..plan import RenderSpec, Task, build_targets, group_by_encoder
from ..stages import CRASH_ENV, RenderContext, Rendered, embed, render, write
from . import Job, dispatch, worker_died

log = logging.getLogger("m3d")

#: The driver's settings that actors on other processes or nodes must see too.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "M3D_ALLOW_DOWNLOAD", CRASH_ENV)
ENCODE_RETRIES = 2  # an encode actor that dies is replaced and its batch sent again this often


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'm3d[ray]'") from None
    return ray


TOKEN_NOTICE = "Token authentication is enabled"  # Ray's own notice on every start: not the user's to read


class _DropTokenNotice(logging.Filter):
    """Drops Ray's "token authentication is enabled" notice only; its other warnings (auth disabled
    included) and all errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_NOTICE)


def quiet_ray() -> None:
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in logger.filters):
        logger.addFilter(_DropTokenNotice())


ADDRESS_LINE = b"m3d local ray at "  # the keeper's one line on stdout
# Ray's token authentication, asked for by name: Ray's default for a new local Ray, but a driver that
# joins by address uses it only when told, and naming it spares every run Ray's notice that it is on
AUTH = {"RAY_AUTH_MODE": "token"}


class LocalRay:
    """A local Ray for one sync, that goes down with the sync however it ends (kill -9 included).

    A Ray that ray.init() starts in the driver survives the driver's kill -9 in part (its dashboard and
    runtime-env agents and workers stay, ppid 1, ~180 MB). So the head runs in a keeper process of its
    own session (`python -m m3d.pipeline.engines.ray`, every Ray process its descendant in one process
    group) that reads its stdin: the driver holds the other end, and when that closes (the driver ended,
    failed or was killed) the keeper shuts Ray down and kills whatever of its group is left."""

    def __enter__(self) -> str:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, start_new_session=True,
                                     env={**os.environ, **AUTH})
        for line in self.proc.stdout:  # Ray may print before the keeper does
            if line.startswith(ADDRESS_LINE):
                return line[len(ADDRESS_LINE):].decode().strip()
        self.proc.wait()
        self.log.seek(0)
        tail = " ".join(self.log.read().decode(errors="replace").strip().splitlines()[-1:])
        raise M3DError(f"could not start a local Ray (exit {self.proc.returncode}): {tail}")

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()  # the keeper's signal to shut down
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


def _keep_head() -> None:
    """The keeper (see LocalRay): start a local Ray, print its address, hold it until stdin closes."""
    import psutil

    ray = _ray()
    quiet_ray()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides; a terminal's ^C reaches it
    ours: list = []
    try:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
        print(ADDRESS_LINE.decode() + ray.get_runtime_context().gcs_address, flush=True)
        sys.stdin.buffer.read()  # returns at EOF: the driver is gone or done
        ours = psutil.Process().children(recursive=True)  # Ray's workers make process groups of their own
        ray.shutdown()
    finally:
        group = os.getpgid(0)
        for proc in {*ours, *(p for p in psutil.process_iter() if _in_group(p, group))}:
            try:
                proc.kill()  # what outlived the shutdown (psutil checks it is still the same process)
            except psutil.Error:
                pass


def _in_group(proc, group: int) -> bool:
    try:
        return proc.pid != os.getpid() and os.getpgid(proc.pid) == group
    except OSError:
        return False


class RenderActor:
    """A render worker on the cluster: its RenderContext is made once, when the actor starts."""

    def __init__(self, spec: RenderSpec):
        self.context = RenderContext(spec)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def render(self, task: Task) -> tuple[Rendered, Any]:
        """(the outcome without its views, the views): the driver fetches only the first."""
        item = render(task, self.context)
        views, item.views = item.views, None
        return item, views


class EncodeActor:
    """An encode worker: its own copies of the encoders, on the device Ray gave it."""

    def __init__(self, options: SyncOptions):
        from ...encoders import load_encoder

        encoders = [load_encoder(spec, device=options.device, precision=options.precision,
                                 batch_size=options.batch_size) for spec in options.encoders]
        self.encoders = group_by_encoder(build_targets(encoders, options))
        self.batch_images = max(e.batch_size for e in encoders)
        self.device = str(encoders[0].device)

    def info(self) -> dict:
        import ray

        return {"batch_images": self.batch_images, "device": self.device,
                "node": ray.get_runtime_context().get_node_id()}

    def embed(self, metas: list[Rendered], *views) -> tuple[list, float]:
        start = time.perf_counter()
        points = embed([replace(meta, views=v) for meta, v in zip(metas, views)], self.encoders)
        return points, time.perf_counter() - start


@dataclass
class _Renderer:
    actor: Any
    node: Any = None  # a ref to the id of the node it runs on (answered once it started)
    in_flight: deque = field(default_factory=deque)  # (task, meta_ref, views_ref), in submission order
    isolated: bool = False  # running one suspect alone


@dataclass
class _Encoder:
    actor: Any
    busy: int = 0


CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str | None) -> None:
    """One line at once for a cluster address nothing answers at: ray.init itself retries such an
    address for ever, printing a warning every few seconds. None, "auto" and "local" are Ray's to
    resolve; an address without a port is left to Ray as well."""
    import socket

    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise M3DError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                       "`ray start --head` or fix --ray-address / RAY_ADDRESS") from None


@contextlib.contextmanager
def _environment(ray, values: dict[str, str]):
    """Ray's RAY_* settings from os.environ with these values for the block, as they were afterwards.
    Ray reads them once per process (RayConfig): read again after each change."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    ray._raylet.Config.initialize("")
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ray._raylet.Config.initialize("")


def run(job: Job) -> None:
    ray = _ray()
    quiet_ray()
    options = job.options
    if ray.is_initialized():  # the caller's Ray (a library user, the tests)
        _Scheduler(ray, job).run()
        return
    address = options.ray_address or os.environ.get("RAY_ADDRESS")
    check_reachable(address)
    with contextlib.ExitStack() as stack:
        if address in (None, "", "local"):
            address = stack.enter_context(LocalRay())
            stack.enter_context(_environment(ray, AUTH))
        ray.init(address=address, logging_level=logging.WARNING)
        stack.callback(ray.shutdown)
        _Scheduler(ray, job).run()


class _Scheduler:
    def __init__(self, ray, job: Job):
        self.ray, self.job = ray, job
        options = job.options
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        on_gpu = gpus > 0 and options.device != "cpu"
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        runtime = {"runtime_env": {"env_vars": env}} if env else {}
        # encoders: one actor per GPU, each with a core to feed it; on CPUs one actor that shares the
        # cores with the renderers (as the local engine's encoder thread does)
        encode_n = gpus if on_gpu else 1
        self.encode_cls = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=1 if on_gpu else 0, **runtime)(EncodeActor)
        render_n = options.workers or max(1, cpus - (encode_n if on_gpu else 0))
        if render_n > cpus:
            raise UsageError(f"--workers {render_n} asks for {render_n} render actors of one CPU each; "
                             f"the Ray cluster has {cpus} CPUs")
        self.render_cls = ray.remote(num_cpus=1, **runtime)(RenderActor)
        self.spec = job.plan.render
        # encoders first: on a GPU node with one CPU per GPU, a render actor placed there first would
        # take the CPU its encoder needs, and the encoder would wait for ever
        self.encoders = [_Encoder(self.encode_cls.remote(options)) for _ in range(encode_n)]
        infos = [self._get(e.actor.info.remote(), "encode") for e in self.encoders]
        info = infos[0]
        self.renderers = [self._renderer() for _ in range(render_n)]
        placement = {"encode": dict(Counter(i["node"] for i in infos)),
                     "render": dict(Counter(self._get(r.node, "render") for r in self.renderers))}
        self.batch_images = info["batch_images"]
        views = self.spec.view.views
        per_batch = -(-self.batch_images // views)
        self.window = max(2 * per_batch + 2 * render_n, 4 * render_n)  # a batch encodes while the next renders
        stats, report = job.stats, job.tally.report
        report.workers = stats.render_workers = render_n
        stats.encode_workers = encode_n
        report.resources = {"cpus": cpus, "gpus": gpus, "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                            "render_workers": render_n, "encode_workers": encode_n, "encode_device": info["device"],
                            "placement": placement}  # node id -> actors of each stage at the start
        log.info("ray: %d CPUs, %d GPUs; %d render actors, %d encode actors (%s), %d images per batch",
                 cpus, gpus, render_n, encode_n, info["device"], self.batch_images)

    def _renderer(self) -> _Renderer:
        actor = self.render_cls.remote(self.spec)
        return _Renderer(actor, actor.node.remote())

    def _get(self, ref, stage: str):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                raise M3DError(f"{stage} actor could not start: {exc}") from None
            raise

    def run(self) -> None:
        ray, tally = self.ray, self.job.tally
        self.queued: deque[Task] = deque(self.job.plan.tasks)
        self.suspects: deque[Task] = deque()
        self.batch: list[tuple[Rendered, Any]] = []
        self.encoding: dict[Any, tuple[_Encoder, list, int]] = {}  # ref -> (actor, batch, attempt)
        self.rerendered: dict[str, int] = {}  # file -> times its views were lost and it was rendered again
        try:
            while self.queued or self.suspects or self.batch or self.encoding or self._rendering():
                self._dispatch()
                owner = {entry[1]: r for r in self.renderers for entry in r.in_flight}
                refs = list(owner) + list(self.encoding)
                ray.wait(refs, num_returns=1)
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    if ref in self.encoding:
                        self._encoded(ref)
                    elif any(ref == e[1] for e in owner[ref].in_flight):  # not already handled with a death
                        self._rendered(owner[ref], ref)
                tally.tick()
        finally:
            for actor in [r.actor for r in self.renderers] + [e.actor for e in self.encoders]:
                ray.kill(actor)

    def _rendering(self) -> int:
        return sum(len(r.in_flight) for r in self.renderers)

    def _dispatch(self) -> None:
        """Render tasks within the window (objects waiting for or in an encode batch count); a batch
        to the least busy encoder when it is full, or when nothing else is coming."""
        waiting = len(self.batch) + sum(len(b) for _, b, _ in self.encoding.values())
        dispatch(self.renderers, self.queued, self.suspects, self.window, waiting, self._send)
        full = len(self.batch) * self.spec.view.views >= self.batch_images
        if self.batch and (full or not (self._rendering() or self.queued or self.suspects)):
            self._encode(self.batch, 0)
            self.batch = []

    def _send(self, r: _Renderer, task: Task) -> None:
        meta, views = r.actor.render.options(num_returns=2).remote(task)
        r.in_flight.append((task, meta, views))

    def _encode(self, batch: list, attempt: int) -> None:
        encoder = min(self.encoders, key=lambda e: e.busy)
        encoder.busy += 1
        ref = encoder.actor.embed.remote([m for m, _ in batch], *[v for _, v in batch])
        self.encoding[ref] = (encoder, batch, attempt)

    def _rendered(self, r: _Renderer, ref) -> None:
        try:
            meta = self._get(ref, "render")
        except self.ray.exceptions.RayActorError:
            self._died(r)
            return
        entry = next(e for e in r.in_flight if e[1] == ref)
        r.in_flight.remove(entry)
        if not r.in_flight:
            r.isolated = False
        self._take(meta, entry[2])

    def _take(self, meta: Rendered, views_ref) -> None:
        self.job.stats.render += meta.seconds
        if meta.reason is not None:
            self.job.tally.skipped(meta)
        else:
            self.batch.append((meta, views_ref))

    def _died(self, r: _Renderer) -> None:
        """A render actor died: keep what it finished, retry the rest alone; a task that was alone on
        it is what killed it, and is skipped."""
        crashed = []
        for task, meta, views in r.in_flight:
            try:
                self._take(self.ray.get(meta, timeout=0), views)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
                crashed.append(task)
        self.ray.kill(r.actor)
        if not self._node_alive(r.node):  # its node left the cluster: no file is to blame
            log.warning("a Ray node left the cluster; its %d render tasks go to the other actors", len(crashed))
            self.queued.extendleft(reversed(crashed))
            r.in_flight = deque()  # its other answers, if any arrive, are already handled
            self.renderers.remove(r)  # no replacement: the cluster has one CPU fewer
            if not self.renderers:
                raise M3DError("the Ray cluster lost the nodes of every render actor; what was written is "
                               "kept: run the same sync again once the cluster is back")
            return
        skip = worker_died(r, crashed, self.suspects)
        if skip is not None:
            self.job.tally.skipped(skip)
        fresh = self._renderer()
        r.actor, r.node, r.in_flight, r.isolated = fresh.actor, fresh.node, deque(), False

    def _answers(self, encoder: _Encoder) -> bool:
        """Whether the encode actor is alive (it answers after any batch it is busy with)."""
        try:
            self.ray.get(encoder.actor.info.remote())
            return True
        except self.ray.exceptions.RayActorError:
            return False

    def _node_alive(self, node_ref) -> bool:
        try:
            node = self.ray.get(node_ref, timeout=0)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            return True  # it never started: not a node's loss
        return any(n["NodeID"] == node and n.get("Alive") for n in self.ray.nodes())

    def _encoded(self, ref) -> None:
        encoder, batch, attempt = self.encoding.pop(ref)
        encoder.busy -= 1
        try:
            points, seconds = self._get(ref, "encode")
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError) as exc:
            if isinstance(exc, self.ray.exceptions.RayActorError) and not self._answers(encoder):
                if attempt >= ENCODE_RETRIES:
                    raise M3DError(f"an encode actor died {attempt + 1} times on one batch; see the Ray logs") from None
                log.warning("an encode actor died; starting another and sending its batch again")
                self.ray.kill(encoder.actor)
                encoder.actor = self.encode_cls.remote(self.job.options)
                self._encode(batch, attempt + 1)
                return
            # the actor is well: its input was lost (views in the object store of a node that left the
            # cluster; Ray names the loss with the error of whatever made them): render them again
            tasks = [meta.task for meta, _ in batch]
            for task in tasks:
                path = task.file.rel_path
                self.rerendered[path] = self.rerendered.get(path, 0) + 1
                if self.rerendered[path] > ENCODE_RETRIES:
                    raise M3DError(f"the views of {path!r} were lost {ENCODE_RETRIES + 1} times: {exc}") from None
            log.warning("views of %d objects were lost with a Ray node; rendering them again", len(batch))
            self.queued.extendleft(reversed(tasks))
            return
        self.job.stats.encode += seconds
        write(points, self.job.writer)
        self.job.tally.embedded_batch(len(batch))


if __name__ == "__main__":
    _keep_head()
