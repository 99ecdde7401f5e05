"""What a sync is asked to do: the options every engine reads, and the exit statuses it ends with."""

from __future__ import annotations

from dataclasses import dataclass

from ..meshio import DEFAULT_MAX_FACES
from ..render import ViewSettings

DEFAULT_ENCODERS = ("clip", "dinov2")
DEFAULT_POOLS = ("mean", "max", "attn")

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
