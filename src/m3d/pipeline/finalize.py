"""The driver's side of a run, whatever engine scheduled it: the tally of outcomes as they arrive, and
finalize (prune what is gone, bring FAISS in step with Qdrant, write the report)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from .. import manifest
from ..store import Session
from .options import EXIT_OK, EXIT_SKIPPED
from .plan import Plan, Stored, manifest_rows, save_rules
from .stages import Rendered, StageStats

log = logging.getLogger("m3d")


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
    objects_per_s: float = 0.0  # embedded objects over the whole sync's seconds
    stream_objects_per_s: float = 0.0  # over the engine's run only (first task to last write)
    stages: StageStats = field(default_factory=StageStats)
    workers: int = 0
    engine: str = "local"
    resources: dict = field(default_factory=dict)  # what the engine ran on: cpus, gpus, nodes, workers per stage
    index_seconds: dict[str, float] = field(default_factory=dict)  # collection -> HNSW/quantization build time
    orientation: dict | None = None  # --up auto: the axis the dataset agreed on, objects turned against it
    from_manifest: list[str] = field(default_factory=list)  # collections planned from their sync manifest (no scan)
    exit_status: int = EXIT_OK

    def summary(self) -> dict:
        data = asdict(self)
        data["skipped"] = len(self.skipped)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SyncReport":
        """A report sent as asdict(report) (a sync run by `m3d serve` for `m3d sync`), read back."""
        known = {f.name for f in fields(cls)}
        report = cls(**{k: v for k, v in data.items() if k in known and k != "stages"})
        report.stages = StageStats(**data.get("stages", {}))
        return report


Progress = Callable[[int, int, SyncReport], None]  # (done, total, report so far)


class Tally:
    """Outcomes as an engine reports them: skips adjust the counts, embedded objects count as done."""

    def __init__(self, plan: Plan, report: SyncReport, progress: Progress | None = None):
        self.plan, self.report, self.progress = plan, report, progress
        self.done = self.embedded = 0
        self.unusable: list[str] = []  # stored from an earlier, readable version: the vector no longer describes the file

    def skipped(self, item: Rendered) -> None:
        self.report.skipped.append({"rel_path": item.file.rel_path, "reason": item.reason})
        if item.task.changed:
            self.report.updated -= 1
            if item.bad_input:  # its content changed and is now unusable: the old vector goes
                self.unusable.append(item.task.id)
        else:
            self.report.added -= 1
        self.done += 1

    def embedded_batch(self, count: int) -> None:
        self.done += count
        self.embedded += count

    def tick(self) -> None:
        if self.progress:
            self.progress(self.done, len(self.plan.tasks), self.report)


def finalize(session: Session, plan: Plan, tally: Tally, started: float, elapsed: float, *,
             known: dict[str, dict[str, Stored]], trusted: set[str], written: dict[str, dict[str, Stored]],
             pipelines: dict[str, dict]) -> SyncReport:
    """Delete the points of files that are gone or turned unusable, build each collection's index,
    save FAISS (kept in step with every write), publish rebuilt versions, save each changed collection's
    sync manifest (known: what the plan read; trusted: the collections read from their manifest;
    written: what the writer stored; pipelines: each collection's fingerprint payload), and write the
    report (last, so a crash before it leaves no report of a finished run)."""
    report = tally.report
    tally.tick()
    gone = plan.remove + tally.unusable
    for name in report.collections:
        session.delete(plan.versions.get(name, name), gone)
    if gone or plan.tasks or plan.restamp:
        session.vectors.flush()
    for name in report.collections:  # HNSW where the settings call for it; FAISS (kept in step) saved
        where = plan.versions.get(name, name)
        report.index_seconds[name] = session.finish(where)
        save_rules(session, where, plan)  # every point is written: the rules they were posed by go with them
        if where != name:  # a rebuild is complete: readers move to it at once
            session.publish(name, where)
            log.info("%s now reads from %s", name, where)
    removed = set(gone)
    # a collection read from a manifest that still vouches for it, and not written since, keeps it as it is
    stale = [name for name in report.collections
             if name not in trusted or written.get(name) or plan.restamp.get(name) or removed]
    if stale:
        session.vectors.flush()  # the signature a manifest records is the one the files keep
    for name in stale:
        manifest.write(session, name, pipelines[name],
                       manifest_rows(plan, known.get(name, {}), name, written.get(name, {}), removed))
    report.seconds = time.perf_counter() - started
    # the whole sync (plan, up rules, start-up, index), as the user waited for it; the engine's run alone beside it
    report.objects_per_s = tally.embedded / report.seconds if tally.embedded and report.seconds > 0 else 0.0
    report.stream_objects_per_s = tally.embedded / elapsed if tally.embedded and elapsed > 0 else 0.0
    report.exit_status = EXIT_SKIPPED if report.skipped else EXIT_OK
    session.write_report("last-sync.json", {**asdict(report)})
    return report
