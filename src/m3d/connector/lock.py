"""One process at a time per store directory: an flock on `<store>/lock`, released by the kernel even
on kill -9, with the holder's pid and command written inside so the next one can say who is busy.

A store that cannot be written (a read-only mount, a published copy, a full disk) is still locked for
reading: the lock file is opened read-only (flock needs no write access) and the holder's note is
skipped; where no lock file exists and none can be made, nothing could write the store either."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

from ..errors import StoreBusyError, StoreError, no_space

#: errnos that mean "this store cannot be written here", not "something is wrong".
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC}


def command_name(argv: list[str]) -> str:
    """`m3d sync`, from `m3d -v sync ...`: the subcommand, not the first option."""
    words = [a for a in argv[1:] if not a.startswith("-")]
    return " ".join(["m3d", *words[:1]])


class StoreLock:
    def __init__(self, store_dir: Path, *, write: bool = True):
        self.path = Path(store_dir) / "lock"
        self.write = write
        self._handle = None

    def __enter__(self) -> "StoreLock":
        handle = self._open()
        if handle is None:
            return self
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip() or "another process"
            handle.close()
            raise StoreBusyError(f"store {self.path.parent} is busy: {holder} is using it; try again when it ends") from None
        if handle.writable():
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} ({command_name(sys.argv)})".encode())
            except OSError:  # a full disk: the note is a courtesy, the lock itself holds
                pass
        self._handle = handle
        return self

    def _open(self):
        """The lock file, opened for writing where possible; None when a reader finds none and none
        can be made (a read-only store)."""
        try:
            if self.write:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a+b", buffering=0)  # unbuffered: a full disk fails here, not at close
        except IsADirectoryError:
            raise StoreError(f"store {self.path.parent}: {self.path} is a directory, not m3d's lock file: move it "
                             "away (nothing of the store is in it), then run the command again") from None
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                raise StoreError(f"store {self.path.parent}: cannot use {self.path} ({exc.strerror})") from None
            if self.write and exc.errno == errno.ENOSPC:
                raise no_space(self.path.parent) from None
            if self.write:
                raise StoreError(f"store {self.path.parent} cannot be written ({exc.strerror}): this command "
                                 "writes; info, query and check still read it") from None
        try:
            return open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"store {self.path.parent}: cannot read {self.path} ({exc.strerror})") from None

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            if self._handle.writable():
                try:
                    self._handle.seek(0)
                    self._handle.truncate()
                except OSError:
                    pass
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
