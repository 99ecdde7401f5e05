"""The one place that names every stored field: payloads, pipeline fingerprints, collection names."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from . import __version__
from .errors import M3DError, StoreError
from .render import ViewSettings

COLLECTION_PREFIX = "m3d"

#: Payload keys with a keyword index (the dashboard and `--class` filter on them).
INDEXED_KEYWORDS = ("class", "split", "dataset")

#: What the file system says about a file, compared the way version control compares it: any
#: difference means its content is hashed again (size and mtime alone miss `cp -p`, `rsync -a` edits).
STAMP_FIELDS = ("file_size", "mtime_ns", "ctime_ns", "inode")

#: Payload keys the incremental sync reads back to decide what changed.
SYNC_FIELDS = ["path", "dataset", "content_hash", *STAMP_FIELDS, "pipeline", "pose"]


#: Payload key of each ViewSettings field inside a point's "pipeline" (resolution = size: the old name).
VIEW_KEYS = {"views": "views", "elevation": "elevation", "size": "resolution", "renderer": "renderer",
             "up": "up", "layout": "layout", "align": "align"}
#: What a point written before a setting existed was made with: the ring about +y, no pose alignment.
LEGACY_VIEW = {"up": "y", "layout": "ring", "align": "none"}
#: What a point written before precision was recorded reads as: fp32, what HOG always computes and the
#: CPU default of most machines then (a bf16-built CLIP store re-syncs with --precision bf16).
LEGACY_PRECISION = "fp32"


@dataclass(frozen=True)
class Fingerprint:
    """Everything that decides what a vector means. Two vectors are comparable only when equal."""

    encoder: str  # the spec that loads the encoder again: alias, hub id or absolute directory
    model_id: str
    pool: str
    view: ViewSettings
    precision: str = LEGACY_PRECISION  # what the encoder computed in: queries encode the same way

    def to_payload(self) -> dict:
        view = asdict(self.view)
        return {"encoder": self.encoder, "model_id": self.model_id, "pool": self.pool,
                "precision": self.precision, **{key: view[field] for field, key in VIEW_KEYS.items()}}

    @classmethod
    def from_payload(cls, data: dict) -> "Fingerprint":
        """Read a stored fingerprint; settings added after it was written take their LEGACY_VIEW value."""
        view = {field: data.get(key, LEGACY_VIEW.get(field)) for field, key in VIEW_KEYS.items()}
        if view["layout"] != "ring":  # the sphere has no elevation (its first points recorded the ring's)
            view["elevation"] = None
        missing = [VIEW_KEYS[f] for f, v in view.items() if v is None and not (f == "elevation" and view["layout"] != "ring")]
        if missing:
            raise StoreError(f"stored pipeline fingerprint lacks {', '.join(missing)}")
        if view["elevation"] is not None:
            view["elevation"] = float(view["elevation"])
        return cls(encoder=data["encoder"], model_id=data["model_id"], pool=data["pool"], view=ViewSettings(**view),
                   precision=data.get("precision", LEGACY_PRECISION))

    def differences(self, other: "Fingerprint") -> list[str]:
        """Human-readable `field: stored -> requested` lines (self is the requested one)."""
        mine, theirs = self.to_payload(), other.to_payload()
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs[k]]

    def matches(self, stored: dict | None) -> bool:
        """Whether a point's stored "pipeline" payload describes these settings (old points included)."""
        if stored == self.to_payload():
            return True
        try:
            return stored is not None and Fingerprint.from_payload(stored) == self
        except (KeyError, TypeError, M3DError):
            return False


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
    stamp: dict[str, int],
    vertices: int,
    faces: int,
    fingerprint: Fingerprint,
    pose: dict | None,
    views_shown: int,
) -> dict:
    """The payload stored with every point: what users filter and audit by."""
    return {
        "class": label,
        "split": split,
        "path": rel_path,
        "dataset": dataset,
        "content_hash": content_hash,
        **{key: stamp[key] for key in STAMP_FIELDS},
        "vertices": vertices,
        "faces": faces,
        "pipeline": fingerprint.to_payload(),
        "pose": pose,  # the rotation applied before rendering (orientation.Pose)
        "views_shown": views_shown,  # views that showed the object: the ones pooled into the vector
        "m3d_version": __version__,
    }
