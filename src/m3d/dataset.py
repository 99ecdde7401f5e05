"""Discovery: walk a folder of meshes, read class and split from the path, pick a subset.

Accepts ModelNet's `<class>/<split>/<name>.off` and the plain `<class>/<name>.off`. Files with other
endings are ignored (a README at the root is normal); mesh files that cannot be used as objects
(too shallow, dangling links, loops) come back as skips with a reason so the sync report lists them.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .meshio import MESH_EXTENSIONS

#: Namespace of point ids: uuid5(POINT_NAMESPACE, relative path) is stable across machines and runs.
POINT_NAMESPACE = uuid.UUID("6f1d8a52-3c1e-5b7a-9a7e-2f4c0d9e8b11")

KNOWN_SPLITS = frozenset({"train", "test", "val", "valid", "validation"})


@dataclass(frozen=True)
class MeshFile:
    """One object to embed: where it is and what the path says about it."""

    path: Path  # absolute path on this machine (never stored)
    rel_path: str  # posix path relative to the synced root
    label: str  # class, from the first folder under the root
    split: str | None  # train/test/... when the layout has a split folder
    dataset: str  # the collection of files it belongs to (default: the root folder's name)

    @property
    def point_id(self) -> str:
        return point_id(self.dataset, self.rel_path)


@dataclass(frozen=True)
class Skip:
    """A file that was not embedded, and why (one line)."""

    rel_path: str
    reason: str


def point_id(dataset: str, rel_path: str) -> str:
    """Deterministic point id from the dataset name and the path inside it: a re-run overwrites
    instead of duplicating, and two datasets with the same relative paths (ModelNet10 and
    ModelNet40 share chair/train/chair_0001.off) never overwrite each other."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{dataset}/{rel_path}"))


def dataset_identity(root: str | Path, dataset: str | None = None) -> tuple[Path, str]:
    """Where a dataset lives and what it is called, from the path the user gave (absolute, symlinks
    kept): `current -> v1` re-pointed to v2 is still dataset `current`, never a second copy named v2."""
    given = Path(os.path.abspath(root))
    return given, dataset or given.name


def file_stamp(path: Path) -> dict[str, int]:
    """Size, mtime, ctime and inode (schemas.STAMP_FIELDS): an edit that restores the mtime still
    moves the ctime, and a file replaced by a copy has a new inode."""
    stat = path.stat()
    return {"file_size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino}


def content_hash(path: Path) -> str:
    """blake2b of the file bytes: what decides whether a known file changed."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_hash(data: bytes) -> str:
    """content_hash of bytes already in memory (the same digest)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def label_and_split(rel_parts: tuple[str, ...]) -> tuple[str, str | None] | None:
    """Class and split from a path relative to the root, or None when the layout says neither."""
    if len(rel_parts) < 2:
        return None
    label = rel_parts[0]
    split = rel_parts[1] if len(rel_parts) >= 3 and rel_parts[1].lower() in KNOWN_SPLITS else None
    return label, split


def discover(
    root: str | Path,
    *,
    classes: list[str] | None = None,
    split: str | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    dataset: str | None = None,
) -> tuple[list[MeshFile], list[Skip]]:
    """All mesh files under root (sorted by relative path), filtered the way the reference experiment
    selected its subset: by class, by split, the first N per class by file name, then a global limit."""
    given, dataset = dataset_identity(root, dataset)
    if not given.is_dir():
        raise UsageError(f"{root}: not a directory")
    root = given.resolve()  # walked through its real path; named after the given one
    wanted = {c.lower() for c in classes} if classes else None
    files: list[MeshFile] = []
    skips: list[Skip] = []
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=None):
        here = Path(dirpath)
        try:
            stat = here.stat()
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in visited:  # a directory symlink loop: walk each folder once
            dirnames[:] = []
            skips.append(Skip(here.relative_to(root).as_posix(), "directory symlink loop, not followed"))
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if suffix not in MESH_EXTENSIONS:
                continue
            path = here / name
            rel = path.relative_to(root)
            rel_path = rel.as_posix()
            shown = os.fsencode(rel_path).decode("utf-8", "backslashreplace")
            if shown != rel_path:  # undecodable bytes: no id, payload or report can hold this name
                skips.append(Skip(shown, "file name is not valid UTF-8: rename it (e.g. convmv -f latin1 -t utf8)"))
                continue
            parsed = label_and_split(rel.parts)
            if parsed is None:
                skips.append(Skip(rel_path, "mesh at the dataset root has no class folder"))
                continue
            label, file_split = parsed
            if wanted is not None and label.lower() not in wanted:
                continue
            if split is not None and (file_split or "").lower() != split.lower():
                continue
            files.append(MeshFile(path=path, rel_path=rel_path, label=label, split=file_split, dataset=dataset))
    files.sort(key=lambda f: f.rel_path)
    if wanted is not None:
        missing = sorted(wanted - {f.label.lower() for f in files})
        if missing:
            raise UsageError(f"no meshes found for class(es): {', '.join(missing)}")
    if per_class is not None:
        taken: dict[str, int] = {}
        kept = []
        for f in files:
            if taken.get(f.label, 0) < per_class:
                taken[f.label] = taken.get(f.label, 0) + 1
                kept.append(f)
        files = kept
    if limit is not None:
        files = files[:limit]
    if not files:
        what = f" in split {split!r}" if split else ""
        raise UsageError(f"no mesh files ({' '.join(sorted(MESH_EXTENSIONS))}){what} under {root}")
    return files, skips
