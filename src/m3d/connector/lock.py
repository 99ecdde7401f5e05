"""One process at a time per store directory: an flock on `<store>/lock`, released by the kernel even
on kill -9, with the holder's pid and command written inside so the next one can say who is busy."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from ..errors import StoreBusyError


class StoreLock:
    def __init__(self, store_dir: Path):
        self.path = Path(store_dir) / "lock"
        self._handle = None

    def __enter__(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StoreBusyError(f"store {self.path.parent} is busy: {holder} is using it; try again when it ends") from None
        handle.seek(0)
        handle.truncate()
        command = " ".join(["m3d", *sys.argv[1:2]]) if sys.argv else "m3d"
        handle.write(f"pid {os.getpid()} ({command})")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
