"""Engines: schedulers of the same stage functions. Each gets a Job (the plan, the loaded encoders, the
writer, the tally) and runs render -> embed -> write over the plan's tasks; the driver then finalizes.
Registered by name and imported on use, so an engine's own dependencies load only when it is chosen."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..finalize import Tally
from ..options import ENGINES, SyncOptions
from ..plan import Plan, Target
from ..stages import StageStats, Writer

@dataclass
class Job:
    """Everything an engine needs to run a plan."""

    plan: Plan
    options: SyncOptions
    encoders: dict[str, tuple[Any, list[Target]]]  # plan.group_by_encoder(targets)
    writer: Writer
    tally: Tally

    @property
    def stats(self) -> StageStats:
        return self.tally.report.stages


def engine(name: str) -> Callable[[Job], None]:
    """The engine's `run(job)`; names are checked by SyncOptions."""
    return importlib.import_module(ENGINES[name]).run
