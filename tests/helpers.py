"""Shared test helpers: ModelNet-layout trees built in temp dirs from the real dev meshes."""

from __future__ import annotations

import shutil
from pathlib import Path


def make_tree(lpsb: Path, root: Path, classes: dict[str, int], *, copy: bool = False, split: str | None = "train") -> Path:
    """root/<class>/<split>/<id>.off for the first N meshes of each LPSB class (symlinks unless copy)."""
    for label, count in classes.items():
        sources = sorted((lpsb / label).glob("*.off"), key=lambda p: int(p.stem))[:count]
        folder = root / label / split if split else root / label
        folder.mkdir(parents=True, exist_ok=True)
        for src in sources:
            dest = folder / src.name
            if copy:
                shutil.copyfile(src, dest)
            else:
                dest.symlink_to(src)
    return root
