"""Plan: what must be embedded, as deterministic tasks with stable ids, from the discovered files and
what the store already holds. Everything decided over the whole dataset is decided here, once, before
any engine starts; the engines then only schedule the stage functions over `Plan.tasks`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from ..connector import IndexSettings, shape_text
from ..dataset import MeshFile, content_hash, file_stamp
from ..errors import StoreError
from ..orientation import EVIDENCE_MODEL, Decision, dataset_up, measure_files, valid_evidence
from ..render import ViewSettings
from ..schemas import STAMP_FIELDS, SYNC_FIELDS, Fingerprint, collection_name
from ..store import Session, is_unit
from .options import SyncOptions

log = logging.getLogger("m3d")


@dataclass(frozen=True)
class RenderSpec:
    """How every task of a plan is rendered: what a render worker needs to build its context."""

    view: ViewSettings  # cameras, renderer, up axis, layout, pose alignment
    max_faces: int


@dataclass(frozen=True)
class Task:
    """One object to (re-)embed. Its id is the point id, stable across runs and machines."""

    file: MeshFile
    needs: frozenset[str]  # encoder names whose collections lack a fresh point for it
    changed: bool = False  # stored before with other content (or turned another way now)
    up: Decision | None = None  # --up auto: the up decided for it over the whole dataset

    @property
    def id(self) -> str:
        return self.file.point_id


class Stored(NamedTuple):
    """What the plan reads of one stored point. A payload as a dict is ~4 KB per point and collection;
    this is a few hundred bytes, one copy shared by the collections that hold the same values."""

    fresh: bool  # made with the target's pipeline fingerprint
    dataset: str | None
    content_hash: str | None
    stamp: tuple  # the STAMP_FIELDS values the file had
    up: str | None  # --up auto: the decision stored, and the evidence it was made from (by which model)
    evidence: tuple[float, ...] | None
    model: str | None

    @classmethod
    def of(cls, payload: dict, fingerprint: Fingerprint, current: dict) -> "Stored":
        """current: fingerprint.to_payload(), made once per collection (the usual case compares equal)."""
        pose, pipeline = payload.get("pose") or {}, payload.get("pipeline")
        return cls(pipeline == current or fingerprint.matches(pipeline), payload.get("dataset"),
                   payload.get("content_hash"), tuple(payload.get(key) for key in STAMP_FIELDS), pose.get("up"),
                   tuple(pose["evidence"]) if pose.get("evidence") else None, pose.get("model"))


@dataclass(frozen=True)
class Target:
    """One collection the sync fills: (encoder, pool) and the fingerprint its points carry."""

    collection: str
    encoder: Any  # a loaded m3d.encoders.Encoder
    pool: str
    fingerprint: Fingerprint

    @property
    def views(self) -> int | None:
        """Vectors per point: the views of a multivector pool's collection, None for one pooled vector."""
        from ..pooling import MULTIVECTOR

        return self.fingerprint.view.views if self.pool in MULTIVECTOR else None


@dataclass
class Plan:
    tasks: list[Task]  # sorted by relative path
    remove: list[str]  # point ids of files gone from the dataset: deleted from every collection
    render: RenderSpec
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    # collection -> id -> payload keys to rewrite without a render: a new stamp, a pose measured again
    restamp: dict[str, dict[str, dict]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # collection -> new version written in its place
    orientation: dict | None = None  # --up auto: the dataset's consensus and how many objects left it


def build_targets(encoders: list, options: SyncOptions) -> dict[str, Target]:
    """collection name -> Target, one per (encoder, pool). Engines that load encoders elsewhere (an
    encode actor) call this with their own copies and get the same fingerprints."""
    targets: dict[str, Target] = {}
    for encoder in encoders:  # encoder.spec, never a local path: a checkpoint directory is its model_id
        for pool_name in options.pools:
            fp = Fingerprint(encoder=encoder.spec, model_id=encoder.model_id, pool=pool_name, view=options.view,
                             precision=encoder.precision)
            name = collection_name(encoder.name, pool_name)
            targets[name] = Target(name, encoder, pool_name, fp)
    return targets


def group_by_encoder(targets: dict[str, Target]) -> dict[str, tuple[Any, list[Target]]]:
    """encoder name -> (encoder, its targets): each encoder runs once per batch, each pool once after it."""
    grouped: dict[str, tuple[Any, list[Target]]] = {}
    for target in targets.values():
        grouped.setdefault(target.encoder.name, (target.encoder, []))[1].append(target)
    return grouped


def prepare_collections(session: Session, targets: dict[str, Target], rebuild: bool,
                        index: IndexSettings = IndexSettings()) -> tuple[dict[str, dict[str, Stored]], dict[str, str]]:
    """Create missing collections; refuse ones made with other settings, or with rebuild start a new
    version of each (readers keep the complete old one until finalize publishes the new one).
    Returns what each collection (or its new version) holds: point id -> what decides freshness
    (read page by page, kept compact); and collection -> the version being built in its place."""
    known: dict[str, dict[str, Stored]] = {}
    shared: dict[Any, Any] = {}  # one copy of each id and each Stored across collections
    versions: dict[str, str] = {}
    existing = set(session.collections())
    for name, target in targets.items():
        encoder, fp = target.encoder, target.fingerprint
        if name in existing:
            stored = session.fingerprint(name)
            held = (session.vectors.dim(name), session.vectors.views(name))
            dim_differs = held != (encoder.dim, target.views)
            index_differs = index.differences(session.vectors.index_info(name).settings)
            if (stored is not None and stored != fp) or dim_differs or index_differs:
                if not rebuild:
                    diff = "; ".join(fp.differences(stored) if stored and stored != fp else index_differs or
                                     [f"vectors {shape_text(*held)} -> {shape_text(encoder.dim, target.views)}"])
                    hint = (f"pass --precision {stored.precision} to add to it as it was built, or "
                            if stored is not None and stored.precision != fp.precision else "")
                    raise StoreError(f"collection {name} was built with other settings ({diff}); "
                                     f"{hint}run again with --rebuild to replace it")
                versions[name] = session.vectors.begin_rebuild(name)
                log.info("rebuilding %s as %s; readers keep the current one until it is complete", name,
                         versions[name])
        where = versions.get(name, name)
        session.vectors.ensure_collection(where, encoder.dim, index, views=target.views)
        known[name] = {}
        current = fp.to_payload()
        for rec in session.vectors.records(where, fields=SYNC_FIELDS, vectors=True):  # streamed, page by page
            if is_unit(rec.vector):
                stored = Stored.of(rec.payload, fp, current)
                known[name][shared.setdefault(rec.id, rec.id)] = shared.setdefault(stored, stored)
            else:  # every stored vector is unit length; anything else is damage: embed it again
                log.warning("%s: point %s (%s) has a damaged vector; it will be embedded again",
                            name, rec.id, rec.payload.get("path"))
    return known, versions


def plan_sync(files: list[MeshFile], known: dict[str, dict[str, Stored]], targets: dict[str, Target],
              options: SyncOptions, dataset: str, prune: bool) -> Plan:
    """Compare the files with what each collection holds (id -> payload) and list the work: a point
    is fresh when its file's content and its pipeline fingerprint both match."""
    plan = Plan([], [], RenderSpec(options.view, options.max_faces))
    present = {f.point_id for f in files}
    hash_cache: dict[str, str] = {}
    for file in files:
        pid = file.point_id
        missing: set[str] = set()
        changed = False
        for name, records in known.items():
            record = records.get(pid)
            if record is None or not record.fresh:
                missing.add(targets[name].encoder.name)
                continue
            same, stamp = same_content(file, record, hash_cache, verify=options.verify)
            if not same:
                missing.add(targets[name].encoder.name)
                changed = True
            elif stamp is not None:  # touched, copied with -p, chmod-ed: same bytes, new stamp to remember
                plan.restamp.setdefault(name, {})[pid] = stamp
        if not missing:
            plan.unchanged += 1
            continue
        plan.tasks.append(Task(file, frozenset(missing), changed))
        if changed:
            plan.updated += 1
        else:
            plan.added += 1
    if prune:
        stale = set()
        for records in known.values():
            stale |= {pid for pid, rec in records.items() if rec.dataset == dataset and pid not in present}
        plan.remove = sorted(stale)
    return plan


def same_content(file: MeshFile, record: Stored, hash_cache: dict[str, str], *,
                 verify: bool = False) -> tuple[bool, dict[str, int] | None]:
    """Whether the file still holds what the point was made from, as version control decides it: the
    same size, mtime, ctime and inode mean unchanged; any difference (or verify) means hash and
    compare. Also returns the file's new stamp when only the stamp moved, so it can be remembered."""
    try:
        stamp = file_stamp(file.path)
    except OSError:
        return False, None
    stamp_same = tuple(stamp[key] for key in STAMP_FIELDS) == record.stamp
    if stamp_same and not verify:
        return True, None
    if record.stamp[STAMP_FIELDS.index("file_size")] != stamp["file_size"]:
        return False, None
    if file.rel_path not in hash_cache:
        try:
            hash_cache[file.rel_path] = content_hash(file.path)
        except OSError:
            return False, None
    if hash_cache[file.rel_path] != record.content_hash:
        return False, None
    return True, None if stamp_same else stamp


def plan_orientation(plan: Plan, files: list[MeshFile], known: dict[str, dict[str, Stored]],
                     targets: dict[str, Target], workers: int) -> None:
    """--up auto: decide every object's up over the whole dataset, before anything renders.

    Evidence comes from the stored payloads for unchanged objects and is measured (in `workers`
    processes) for the tasks; the dataset's consensus then decides each object. An unchanged object
    whose decision moved (the dataset's majority changed with new files) becomes a task too. Stored
    evidence that another model made is measured again; where the decision stands, only the stored pose
    is rewritten (no render)."""
    view = plan.render.view
    if view.up != "auto" or view.align != "none":
        return
    stored: dict[str, Stored] = {}
    for records in known.values():
        for pid, rec in records.items():
            if valid_evidence(rec.evidence):
                stored.setdefault(pid, rec)
    queued = {t.id for t in plan.tasks}
    stale = [f for f in files if f.point_id not in queued and f.point_id in stored
             and stored[f.point_id].model != EVIDENCE_MODEL]
    measured = measure_files([t.file.path for t in plan.tasks] + [f.path for f in stale],
                             plan.render.max_faces, workers)
    evidence = {t.id: e for t, e in zip(plan.tasks, measured) if e is not None}
    remeasured = {f.point_id: e for f, e in zip(stale, measured[len(plan.tasks):]) if e is not None}
    for file in files:
        pid = file.point_id
        if pid not in queued and pid in stored:
            evidence[pid] = remeasured[pid] if pid in remeasured else np.asarray(stored[pid].evidence, dtype=np.float64)
    suffixes = {f.point_id: f.path.suffix for f in files}  # every task is one of the files
    dataset = dataset_up(list(evidence.values()), [suffixes[pid] for pid in evidence])
    decided = {pid: Decision(*dataset.choose(ev, suffixes[pid]), tuple(float(x) for x in ev))
               for pid, ev in evidence.items()}
    plan.tasks = [replace(t, up=decided.get(t.id)) for t in plan.tasks]
    every = frozenset(target.encoder.name for target in targets.values())
    reoriented = 0
    for file in files:
        pid = file.point_id
        if pid not in queued and pid in stored and decided[pid].up != stored[pid].up:
            plan.tasks.append(Task(file, every, changed=True, up=decided[pid]))
            plan.unchanged -= 1
            plan.updated += 1
            reoriented += 1
        elif pid in remeasured:  # the same decision from today's model: the stored pose says so from now on
            for name, records in known.items():
                if pid in records:
                    plan.restamp.setdefault(name, {}).setdefault(pid, {})["pose"] = decided[pid].pose().to_payload()
    plan.tasks.sort(key=lambda t: t.file.rel_path)
    turned = sum(1 for pid, d in decided.items()  # against the majority of its own format, where one agrees
                 if (majority := dataset.majority_of(suffixes[pid])) and d.up != majority)
    plan.orientation = {"rule": "auto", **dataset.to_payload(), "against_majority": turned,
                        "reoriented": reoriented}  # unchanged files embedded again (counted in updated)
