"""Engines: schedulers of the same stage functions. Each gets a Job (the plan, the loaded encoders, the
writer, the tally) and runs render -> embed -> write over the plan's tasks; the driver then finalizes.
Registered by name and imported on use, so an engine's own dependencies load only when it is chosen."""

from __future__ import annotations

import importlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ..finalize import Tally
from ..options import ENGINES, SyncOptions
from ..plan import Plan, Target, Task
from ..stages import Rendered, StageStats, Writer

log = logging.getLogger("m3d")

CRASHED = "the renderer crashed on this file (worker process died)"

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


class RenderSlot(Protocol):
    """A render worker as the engines track it: what it was sent and not yet answered."""

    in_flight: Sequence
    isolated: bool  # running one suspect alone: if it dies now, that task killed it


def dispatch(slots: list[RenderSlot], queued: deque[Task], suspects: deque[Task], window: int, busy: int,
             send: Callable[[RenderSlot, Task], None]) -> None:
    """Hand out render tasks. Suspects (tasks that were on a worker that died) go alone to idle workers;
    while some wait, the least busy other worker takes no new task so it soon is idle. Other tasks go to
    the least busy workers while fewer than `window` objects are in flight (`busy` of them elsewhere)."""
    for slot in slots:
        if suspects and not slot.in_flight:
            slot.isolated = True
            send(slot, suspects.popleft())
    open_ = [s for s in slots if not s.isolated]
    if suspects and open_:
        open_.remove(min(open_, key=lambda s: len(s.in_flight)))  # drains, then takes a suspect
    total = busy + sum(len(s.in_flight) for s in slots)
    while queued and open_ and total < window:
        send(min(open_, key=lambda s: len(s.in_flight)), queued.popleft())
        total += 1


def worker_died(slot: RenderSlot, crashed: list[Task], suspects: deque[Task]) -> Rendered | None:
    """The tasks a dead worker had not answered: the one it held alone killed it (its skip is returned);
    otherwise they are all retried, one at a time."""
    if slot.isolated and len(crashed) == 1:
        return Rendered(crashed[0], reason=CRASHED)
    if crashed:
        log.warning("a render worker died; retrying its %d files one at a time", len(crashed))
        suspects.extend(crashed)
    return None
