"""Plan: what must be embedded, as deterministic tasks with stable ids, from the discovered files and
what the store already holds. Everything decided over the whole dataset is decided here, once, before
any engine starts; the engines then only schedule the stage functions over `Plan.tasks`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from .. import manifest
from ..connector import IndexSettings, shape_text
from ..dataset import MeshFile, content_hash, file_stamp
from ..errors import StoreError
from ..orientation import (EVIDENCE_MODEL, UP_KEY, DatasetUp, Decision, Prefetch, Rule, alone, decide_rule, measure_files, sample_of,
                           valid_evidence)
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
    up: Decision | None = None  # --up auto: its format's rule (and evidence measured in the plan)

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

    @classmethod
    def written(cls, payload: dict) -> "Stored":
        """A point this sync wrote (fresh by construction: made with its collection's fingerprint)."""
        return cls.of(payload, None, payload.get("pipeline"))  # type: ignore[arg-type]  (never compared)

    def row(self) -> list:
        """As the sync manifest keeps it (JSON)."""
        return [self.fresh, self.dataset, self.content_hash, list(self.stamp), self.up,
                None if self.evidence is None else list(self.evidence), self.model]

    @classmethod
    def from_row(cls, row: list) -> "Stored":
        fresh, dataset, content_hash, stamp, up, evidence, model = row
        return cls(bool(fresh), dataset, content_hash, tuple(stamp), up,
                   None if evidence is None else tuple(float(x) for x in evidence), model)

    def restamped(self, keys: dict) -> "Stored":
        """After plan.restamp's keys were merged into the point's payload (a new stamp, a pose measured again)."""
        pose = keys.get("pose")
        return self._replace(
            stamp=tuple(keys.get(k, old) for k, old in zip(STAMP_FIELDS, self.stamp)),
            **({} if pose is None else {"up": pose.get("up"), "model": pose.get("model"),
                                        "evidence": tuple(pose["evidence"]) if pose.get("evidence") else None}))


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

    @property
    def dim(self) -> int:
        """Dims of one stored vector (the ring pool's orders are reduced views side by side)."""
        from ..pooling import vector_dim

        return vector_dim(self.pool, self.encoder.dim, self.fingerprint.view.views)


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
    orientation: dict | None = None  # --up auto: each format's rule, what moved and why, what it re-embeds
    up_rules: tuple[str, DatasetUp] | None = None  # --up auto: (dataset, its rules), stored by finalize


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
                        index: IndexSettings = IndexSettings()) -> tuple[dict[str, dict[str, Stored]], dict[str, str], set[str]]:
    """Create missing collections; refuse ones made with other settings, or with rebuild start a new
    version of each (readers keep the complete old one until finalize publishes the new one).
    Returns what each collection (or its new version) holds: point id -> what decides freshness
    (from its sync manifest where one vouches for it, else read page by page, kept compact); collection
    -> the version being built in its place; and the collections whose manifest was used."""
    known: dict[str, dict[str, Stored]] = {}
    shared: dict[Any, Any] = {}  # one copy of each id and each Stored across collections
    versions: dict[str, str] = {}
    trusted: set[str] = set()
    existing = set(session.collections())
    for name, target in targets.items():
        encoder, fp = target.encoder, target.fingerprint
        current = fp.to_payload()
        saved = _from_manifest(session, name, current, shared) if name in existing and not rebuild else None
        if saved is not None:  # made for this fingerprint: only the vectors' shape and index settings to compare
            held = (session.vectors.dim(name), session.vectors.views(name))
            index_differs = index.differences(session.vectors.index_info(name).settings)
            if held != (encoder.dim, target.views) or index_differs:
                diff = "; ".join(index_differs or [f"vectors {shape_text(*held)} -> {shape_text(encoder.dim, target.views)}"])
                raise StoreError(f"collection {name} was built with other settings ({diff}); "
                                 "run again with --rebuild to replace it")
            known[name] = saved
            trusted.add(name)
            continue
        if name in existing:
            stored = session.fingerprint(name)
            held = (session.vectors.dim(name), session.vectors.views(name))
            dim_differs = held != (target.dim, target.views)
            index_differs = index.differences(session.vectors.index_info(name).settings)
            if (stored is not None and stored != fp) or dim_differs or index_differs:
                if not rebuild:
                    diff = "; ".join(fp.differences(stored) if stored and stored != fp else index_differs or
                                     [f"vectors {shape_text(*held)} -> {shape_text(target.dim, target.views)}"])
                    hint = (f"pass --precision {stored.precision} to add to it as it was built, or "
                            if stored is not None and stored.precision != fp.precision else "")
                    raise StoreError(f"collection {name} was built with other settings ({diff}); "
                                     f"{hint}run again with --rebuild to replace it")
                versions[name] = session.vectors.begin_rebuild(name)
                log.info("rebuilding %s as %s; readers keep the current one until it is complete", name,
                         versions[name])
        where = versions.get(name, name)
        session.vectors.ensure_collection(where, target.dim, index, views=target.views)
        known[name] = {}
        for rec in session.vectors.records(where, fields=SYNC_FIELDS, vectors=True):  # streamed, page by page
            if is_unit(rec.vector):
                stored = Stored.of(rec.payload, fp, current)
                known[name][shared.setdefault(rec.id, rec.id)] = shared.setdefault(stored, stored)
            else:  # every stored vector is unit length; anything else is damage: embed it again
                log.warning("%s: point %s (%s) has a damaged vector; it will be embedded again",
                            name, rec.id, rec.payload.get("path"))
    return known, versions, trusted


def _from_manifest(session: Session, name: str, pipeline: dict, shared: dict) -> dict[str, Stored] | None:
    """A collection's points as its sync manifest holds them, or None where none vouches for it now."""
    rows = manifest.read(session, name, pipeline)
    if rows is None:
        return None
    try:
        out = {}
        for pid, row in rows.items():
            stored = Stored.from_row(row)
            out[shared.setdefault(pid, pid)] = shared.setdefault(stored, stored)
        return out
    except (TypeError, ValueError):  # a manifest of another format: the points themselves decide
        return None


def manifest_rows(plan: Plan, known: dict[str, Stored], name: str, written: dict[str, Stored],
                  gone: set[str]) -> dict[str, list]:
    """A collection's manifest after the sync: what the plan read, with this run's restamps, writes
    and deletions applied."""
    restamp = plan.restamp.get(name, {})
    rows = {pid: (rec.restamped(restamp[pid]) if pid in restamp else rec).row()
            for pid, rec in known.items() if pid not in gone}
    rows.update((pid, rec.row()) for pid, rec in written.items() if pid not in gone)
    return rows


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


def stored_rules(session: Session, names: list[str], dataset: str) -> dict[str, DatasetUp | None]:
    """collection -> the up rules it stored for this dataset (None: none, or unreadable)."""
    out = {}
    for name in names:
        records = session.vectors.metadata(name, UP_KEY)
        out[name] = DatasetUp.from_record(records.get(dataset)) if isinstance(records, dict) else None
    return out


def save_rules(session: Session, name: str, plan: Plan) -> None:
    """Store the sync's up rules with a collection once its points are written (finalize): a sync that
    stops earlier leaves the old rules, and the next one checks every object against its new ones."""
    if plan.up_rules is None:
        return
    dataset, rules = plan.up_rules
    records = session.vectors.metadata(name, UP_KEY)
    records = records if isinstance(records, dict) else {}
    if records.get(dataset) != (record := rules.to_record()):  # a re-sync that changed nothing writes nothing
        session.vectors.set_metadata(name, UP_KEY, {**records, dataset: record})


def prefetch_sample(session: Session, files: list[MeshFile], options: SyncOptions, dataset: str,
                    workers: int) -> Prefetch | None:
    """--up auto on a dataset no collection holds rules for (a first sync): start measuring each format's
    sample now, in `workers` processes, so it runs while the encoders load; plan_orientation takes the
    results. None where there is nothing to start (a re-sync measures only new sample members)."""
    view = options.view
    if view.up != "auto" or view.align != "none" or workers < 1:
        return None
    for name in session.collections():
        records = session.vectors.metadata(name, UP_KEY)
        if isinstance(records, dict) and dataset in records:
            return None
    by_format: dict[str, dict[str, MeshFile]] = {}
    for file in files:
        by_format.setdefault(file.path.suffix.lower(), {})[file.point_id] = file
    paths = [group[pid].path for group in by_format.values() if len(group) >= 2 for pid in sample_of(group)]
    return Prefetch(paths, options.max_faces, workers) if paths else None


def plan_orientation(plan: Plan, files: list[MeshFile], known: dict[str, dict[str, Stored]],
                     targets: dict[str, Target], workers: int, session: Session, dataset: str,
                     prefetch: Prefetch | None = None) -> None:
    """--up auto: decide each file format's rule over the whole dataset, before anything renders.

    Each format's rule comes from a fixed sample of its files (orientation.sample_of): their evidence is
    read from the stored rules where the file is unchanged, measured (in `workers` processes) where it
    is new or changed. The tasks carry the rule; the render worker applies it to the mesh it loads (a
    mixed library measures each mesh there, no file is read twice). Where a format's rule is the one
    every collection stored, unchanged objects keep their poses unread; where it moved (or none was
    stored: an old store, once), each unchanged object's stored up is compared with the new decision,
    and those that differ are embedded again, in the collections that hold them turned otherwise."""
    view = plan.render.view
    if view.up != "auto" or view.align != "none":
        return
    started = time.perf_counter()
    try:
        _plan_orientation(plan, files, known, targets, workers, session, dataset, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()
    plan.orientation["seconds"] = round(time.perf_counter() - started, 3)


def _plan_orientation(plan: Plan, files: list[MeshFile], known: dict[str, dict[str, Stored]],
                      targets: dict[str, Target], workers: int, session: Session, dataset: str,
                      prefetch: Prefetch | None) -> None:
    where = {name: plan.versions.get(name, name) for name in targets}
    stored = stored_rules(session, list(where.values()), dataset)
    stored = {name: stored[where[name]] for name in targets}
    previous = next((r for r in stored.values() if r is not None), None)
    queued = {t.id for t in plan.tasks}
    by_format: dict[str, list[MeshFile]] = {}
    for file in files:
        by_format.setdefault(file.path.suffix.lower(), []).append(file)
    ids = {sfx: {f.point_id: f for f in group} for sfx, group in by_format.items()}
    samples = {sfx: sample_of(members) for sfx, members in ids.items() if len(members) >= 2}
    have: dict[str, tuple[float, ...]] = {}
    wanted: list[MeshFile] = []
    for sfx, sample in samples.items():
        kept = previous.samples.get(sfx, {}) if previous else {}
        for pid in sample:
            if pid not in queued and pid in kept:
                have[pid] = kept[pid]
            elif pid not in queued and (rec := _stored_evidence(known, pid)) is not None:
                have[pid] = rec
            else:
                wanted.append(ids[sfx][pid])
    summary: dict[str, dict] = {}
    rules: dict[str, Rule] = {}
    moved: dict[str, str] = {}
    measured = _measure(wanted, plan.render.max_faces, workers, have, prefetch)
    for sfx, sample in samples.items():
        rows = [have[pid] for pid in sample if pid in have]
        if len(rows) < 2:
            continue
        rules[sfx], why = decide_rule(rows, sfx, len(ids[sfx]), previous.rule_of(sfx) if previous else None)
        if why:
            moved[sfx] = why
    up_rules = DatasetUp(rules, {sfx: {pid: have[pid] for pid in samples[sfx] if pid in have} for sfx in rules})
    plan.tasks = [replace(t, up=Decision(rules.get(sfx := t.file.path.suffix.lower()), sfx, have.get(t.id)))
                  for t in plan.tasks]
    # unchanged objects, where a format's rule differs from what a collection stored
    check = [(name, sfx) for name in targets for sfx in by_format
             if not _settled(rules.get(sfx), stored[name], sfx)]
    needs: dict[str, set[str]] = {}
    decided: dict[str, Decision] = {}
    lacking = []
    for sfx in {sfx for _, sfx in check}:
        rule = rules.get(sfx)
        for pid, file in ids[sfx].items():
            if pid in queued:
                continue
            ev = have.get(pid) or _stored_evidence(known, pid)
            if ev is None and (rule is None or rule.needs_evidence):
                lacking.append(file)
            decided[pid] = Decision(rule, sfx, ev)
    measured += _measure(lacking, plan.render.max_faces, workers, have)
    reoriented: dict[str, int] = {}
    for name, sfx in check:
        for pid in ids[sfx]:
            record = known[name].get(pid)
            if pid in queued or record is None:
                continue
            decision = replace(decided[pid], evidence=decided[pid].evidence or have.get(pid))
            if decision.rule is not None and not decision.rule.needs_evidence:
                up = decision.rule.up
            elif decision.evidence is None:  # unreadable now: left as stored (a changed file is a task anyway)
                up = record.up
            else:
                up = (decision.rule.decide(decision.evidence)[0] if decision.rule
                      else alone(np.asarray(decision.evidence), sfx))
            decided[pid] = decision
            if up != record.up:
                needs.setdefault(pid, set()).add(targets[name].encoder.name)
    for pid, encoders in sorted(needs.items()):
        file = next(group[pid] for group in ids.values() if pid in group)
        plan.tasks.append(Task(file, frozenset(encoders), changed=True, up=decided[pid]))
        reoriented[file.path.suffix.lower()] = reoriented.get(file.path.suffix.lower(), 0) + 1
        plan.unchanged -= 1
        plan.updated += 1
    plan.tasks.sort(key=lambda t: t.file.rel_path)
    plan.up_rules = (dataset, up_rules)
    for sfx, group in ids.items():
        entry = summary.setdefault(sfx, {"objects": len(group)})
        if sfx in rules:
            entry.update(up_rules.to_payload()[sfx])
        else:
            entry["up"] = "each file alone"
        if sfx in moved:
            entry["moved"] = moved[sfx]
        entry["reoriented"] = reoriented.get(sfx, 0)
    plan.orientation = {"rule": "auto", "formats": summary, "measured": measured, "checked": len(decided),
                        "reoriented": sum(reoriented.values())}


def _stored_evidence(known: dict[str, dict[str, Stored]], pid: str) -> tuple[float, ...] | None:
    """The evidence a stored point kept, when today's model made it."""
    for records in known.values():
        rec = records.get(pid)
        if rec is not None and rec.model == EVIDENCE_MODEL and valid_evidence(rec.evidence):
            return rec.evidence
    return None


def _measure(files: list[MeshFile], max_faces: int, workers: int, into: dict[str, tuple[float, ...]],
             prefetch: Prefetch | None = None) -> int:
    """Measure the files' evidence into `into` (point id -> evidence; unreadable files are left out),
    taking what the prefetch already measured."""
    taken = {f.point_id: prefetch.take(f.path) if prefetch else (False, None) for f in files}
    rest = [f for f in files if not taken[f.point_id][0]]
    found = dict(zip((f.point_id for f in rest), measure_files([f.path for f in rest], max_faces, workers)))
    for file in files:
        ev = taken[file.point_id][1] if taken[file.point_id][0] else found[file.point_id]
        if ev is not None:
            into[file.point_id] = tuple(float(x) for x in ev)
    return len(files)


def _settled(rule: Rule | None, stored: DatasetUp | None, suffix: str) -> bool:
    """Whether a collection's stored rules already pose this format's objects as `rule` does."""
    if stored is None:
        return False
    before = stored.rule_of(suffix)
    return before is None and rule is None or (rule is not None and rule.same_decisions(before))
