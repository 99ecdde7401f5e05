"""What a sync is asked to do: the options every engine reads, and the exit statuses it ends with."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..connector import IndexSettings
from ..meshio import DEFAULT_MAX_FACES
from ..render import ViewSettings

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
        if self.engine not in ENGINES:
            raise UsageError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        if self.ray_address is not None and self.engine != "ray":
            raise UsageError("--ray-address needs --engine ray")
        if self.workers is not None and (int(self.workers) != self.workers or self.workers < 0):
            raise UsageError(f"workers must be a non-negative integer, got {self.workers!r}")
        if self.engine == "ray" and self.workers == 0:
            raise UsageError("--workers 0 renders in the calling process, which only the local engine does; "
                             "the ray engine needs at least one render actor")
