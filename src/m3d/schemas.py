"""The one place that names every stored field: payloads, pipeline fingerprints, collection names."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from . import __version__

COLLECTION_PREFIX = "m3d"

#: Payload keys with a keyword index (the dashboard and `--class` filter on them).
INDEXED_KEYWORDS = ("class", "split", "dataset")

#: Payload keys the incremental sync reads back to decide what changed.
SYNC_FIELDS = ["path", "dataset", "content_hash", "file_size", "mtime_ns", "pipeline"]


@dataclass(frozen=True)
class Fingerprint:
    """Everything that decides what a vector means. Two vectors are comparable only when equal."""

    encoder: str  # the spec that loads the encoder again: alias, hub id or absolute directory
    model_id: str
    pool: str
    views: int
    elevation: float
    resolution: int
    renderer: str

    def to_payload(self) -> dict:
        return asdict(self)

    @classmethod
    def from_payload(cls, data: dict) -> "Fingerprint":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def differences(self, other: "Fingerprint") -> list[str]:
        """Human-readable `field: stored -> requested` lines."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs[k]]


def collection_name(encoder_name: str, pool: str) -> str:
    """One collection per (encoder, pool): e.g. m3d_dinov2_mean."""
    slug = re.sub(r"[^a-z0-9_]+", "_", encoder_name.lower()).strip("_")
    return f"{COLLECTION_PREFIX}_{slug}_{pool}"


def object_payload(
    *,
    rel_path: str,
    label: str,
    split: str | None,
    dataset: str,
    content_hash: str,
    file_size: int,
    mtime_ns: int,
    vertices: int,
    faces: int,
    fingerprint: Fingerprint,
) -> dict:
    """The payload stored with every point: what users filter and audit by."""
    return {
        "class": label,
        "split": split,
        "path": rel_path,
        "dataset": dataset,
        "content_hash": content_hash,
        "file_size": file_size,
        "mtime_ns": mtime_ns,
        "vertices": vertices,
        "faces": faces,
        "pipeline": fingerprint.to_payload(),
        "m3d_version": __version__,
    }
