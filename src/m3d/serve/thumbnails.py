"""Pictures of stored objects: each object's views rendered once, as its collection rendered them (its
view settings, its stored pose), then kept in the store as PNGs under a key made of the file's content
hash, the view settings and the pose, so a changed file, a re-posed object or other cameras get new
pictures and an unchanged object is never rendered twice, across restarts too."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..schemas import Fingerprint
from ..search import Searcher


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


class Thumbnails:
    def __init__(self, searcher: Searcher, directory: Path):
        self.searcher = searcher
        self.directory = directory
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @staticmethod
    def key(payload: dict, fp: Fingerprint) -> str:
        """What decides the pictures: file content, cameras and renderer, and the pose."""
        what = {"content_hash": payload.get("content_hash"), "path": payload.get("path"),
                "view": asdict(fp.view), "rotation": (payload.get("pose") or {}).get("rotation")}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def views(self, payload: dict, fp: Fingerprint) -> list[Path]:
        """The object's view PNGs, rendered now if this key has none yet (once, whoever asks at once).
        Raises UsageError when its source file is not on this machine (or changed since its sync)."""
        key = self.key(payload, fp)
        folder = self.directory / key[:2] / key
        if not folder.is_dir():
            with self._guard:
                lock = self._locks.setdefault(key, threading.Lock())
            with lock:
                if not folder.is_dir():
                    self._write(folder, self.searcher.stored_views(payload, fp))
        return sorted(folder.glob("*.png"), key=lambda p: int(p.stem))

    def _write(self, folder: Path, views: np.ndarray) -> None:
        """All views into a private folder first, then renamed into place: a reader finds all or none."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            for i, view in enumerate(views):
                (tmp / f"{i}.png").write_bytes(png(view))
            os.chmod(tmp, 0o755)
            tmp.rename(folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():  # else another writer made the same pictures meanwhile
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
