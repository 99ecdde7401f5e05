"""What a sync is asked to do: the options every engine reads, and the exit statuses it ends with."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError
from ..connector import IndexSettings
from ..meshio import DEFAULT_MAX_FACES
from ..render import RAYCAST_NEEDS, ViewSettings, raycast_available

DEFAULT_ENCODERS = ("clip", "dinov2")
DEFAULT_POOLS = ("mean", "max", "attn")

#: Exit statuses of `m3d sync` (documented in the README).
EXIT_OK, EXIT_SKIPPED = 0, 4

#: engine name -> module whose `run(job)` schedules the stages (imported on use: Ray only when chosen)
ENGINES = {"local": "m3d.pipeline.engines.local", "ray": "m3d.pipeline.engines.ray"}


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
    rebuild: bool = False  # replace collections whose fingerprint or index settings differ instead of refusing
    index: IndexSettings = IndexSettings()  # HNSW, quantization, layout of the collections this sync creates
    engine: str = "local"  # which scheduler runs the stages: local (processes + threads) or ray
    ray_address: str | None = None  # the Ray cluster to join (None: RAY_ADDRESS, else a local Ray)
    verify: bool = False  # hash every file, even those whose size, times and inode are unchanged

    def __post_init__(self) -> None:
        """Every value checked here, before a store is opened or a model loaded: the library refuses
        bad options itself (UsageError, one line) instead of a KeyError after an empty collection."""
        from ..encoders.device import PRECISIONS
        from ..pooling import POOLS

        unknown = [p for p in self.pools if p not in POOLS]
        if unknown or not self.pools:
            raise UsageError(f"unknown pool(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                             f"choose from {', '.join(POOLS)}")
        if "ring" in self.pools and self.view.layout != "ring":
            raise UsageError(f"--pools ring matches the views of a ring in order: it needs --layout ring, "
                             f"not {self.view.layout}")
        if not self.encoders or not all(isinstance(e, str) and e.strip() for e in self.encoders):
            raise UsageError("no encoder given: --encoders clip,dinov2,hog or a checkpoint id/directory")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise UsageError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N")
        for name in ("batch_size", "max_faces"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.view.renderer == "raycast" and not raycast_available():
            raise UsageError(RAYCAST_NEEDS)
        if self.engine not in ENGINES:
            raise UsageError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        if self.ray_address is not None and self.engine != "ray":
            raise UsageError("--ray-address needs --engine ray")
        if self.workers is not None and (int(self.workers) != self.workers or self.workers < 0):
            raise UsageError(f"workers must be a non-negative integer, got {self.workers!r}")
        if self.engine == "ray" and self.workers == 0:
            raise UsageError("--workers 0 renders in the calling process, which only the local engine does; "
                             "the ray engine needs at least one render actor")
