"""The sync: discover -> plan -> stage functions scheduled by an engine -> finalize.

    files --plan--> tasks --[engine: render(task) -> embed(batch) -> write(points)]--> Qdrant
          --finalize--> prune what is gone, FAISS in step, report

Qdrant is the record of what is done: each point carries its file's content hash and the pipeline
fingerprint, so a re-run (after a crash, an edit, a new file) plans only the missing work and the
result is the same as one uninterrupted run. Modules: options (SyncOptions), plan (tasks, targets,
collections), stages (render / embed / write), finalize (tally, FAISS, report), engines (schedulers).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..dataset import dataset_identity, discover
from ..store import Session
from .engines import Job, engine
from .finalize import Progress, SyncReport, Tally, finalize
from .options import DEFAULT_ENCODERS, DEFAULT_POOLS, EXIT_OK, EXIT_SKIPPED, SyncOptions
from .plan import build_targets, group_by_encoder, plan_orientation, plan_sync, prefetch_sample, prepare_collections
from .stages import StageStats, Writer

__all__ = ["DEFAULT_ENCODERS", "DEFAULT_POOLS", "EXIT_OK", "EXIT_SKIPPED", "Progress", "StageStats",
           "SyncOptions", "SyncReport", "sync"]

log = logging.getLogger("m3d")


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
    from ..encoders import identify, load_encoder

    started = time.perf_counter()
    explicit = dataset is not None
    root, dataset = dataset_identity(root, dataset)
    files, skips = discover(root, classes=classes, split=split, per_class=per_class, limit=limit, dataset=dataset)
    measure_workers = (os.cpu_count() or 1) if options.workers is None else options.workers
    prefetch = prefetch_sample(session, files, options, dataset, measure_workers)  # measured while the plan is made
    # identities only (config.json, a hog spec): no torch and no weights until there is something to encode
    identities = [identify(spec, device=options.device, precision=options.precision) for spec in options.encoders]
    session.vectors.require_space()  # before the first write: a full disk is one line, never a SIGBUS
    moved_from = session.claim_root(dataset, root, explicit=explicit)
    if moved_from:
        log.warning("dataset %s moved: %s -> %s", dataset, moved_from, root)
    for identity in identities:
        if identity.checkpoint:  # a local directory: its place stays on this machine, never in a payload
            session.remember_checkpoint(identity.model_id, identity.checkpoint)
    targets = build_targets(identities, options)
    # discovered counts what the summary accounts for: the files, and what discovery skipped (links, loops)
    report = SyncReport(str(root), dataset, sorted(targets), discovered=len(files) + len(skips), engine=options.engine)
    report.skipped = [asdict(s) for s in skips]

    known, versions, trusted = prepare_collections(session, targets, options.rebuild, options.index)
    report.from_manifest = sorted(trusted)
    prune = not (classes or split or per_class or limit)
    plan = plan_sync(files, known, targets, options, dataset, prune)
    plan.versions = versions
    # the evidence pass runs before any engine: no GL, no encoder, so it may use every core
    plan_orientation(plan, files, known, targets, measure_workers, session, dataset, prefetch)
    report.orientation = plan.orientation
    report.unchanged, report.added, report.updated = plan.unchanged, plan.added, plan.updated
    report.removed = len(plan.remove)
    for name, stamps in plan.restamp.items():
        session.vectors.set_payload(plan.versions.get(name, name), stamps)  # new stamps, re-measured poses
    log.info("plan: %d to embed (%d new, %d changed), %d unchanged, %d removed", len(plan.tasks), plan.added,
             plan.updated, plan.unchanged, len(plan.remove))

    tally = Tally(plan, report, progress)
    writer = Writer(session, report.stages, routes=plan.versions)
    writer.start()
    run_started = time.perf_counter()
    try:
        if plan.tasks:  # an unchanged re-sync loads no encoder and starts no worker (and no Ray)
            encoders = [load_encoder(identity, device=options.device, precision=options.precision,
                                     batch_size=options.batch_size) for identity in identities]
            engine(options.engine)(Job(plan, options, group_by_encoder(build_targets(encoders, options)), writer, tally))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return finalize(session, plan, tally, started, time.perf_counter() - run_started, known=known, trusted=trusted,
                    written=writer.written, pipelines={n: t.fingerprint.to_payload() for n, t in targets.items()})
