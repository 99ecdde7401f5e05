"""Readers and one writer in one process: what lets `m3d serve` answer queries while a sync writes.

A sync changes a collection in steps (a new generation token, a batch of Qdrant points, the same rows
in FAISS): a query that ran between two of those steps would see half a write. The store's writes all
take the write side of one lock (``Guarded`` wraps the backend; ``Session``'s compound writes take it
around the whole step), and a query takes the read side around everything it reads, so it sees the
collection as it was before a write or after it, never in between. Many queries read at once; a writer
waits for them to finish, and new readers wait while a writer waits (a steady stream of queries cannot
starve a sync).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

#: VectorStore methods that change what is stored (or the engine's files): they take the write side.
WRITES = frozenset({"ensure_collection", "optimize", "drop_collection", "begin_rebuild", "publish", "upsert",
                    "delete", "set_payload", "set_generation", "set_metadata", "flush", "repair", "set_aside",
                    "close"})


class ReadWriteLock:
    """Shared readers, one exclusive writer, writer preferred. Reentrant per thread: the writer may
    write or read again inside its write, and a reader may read again inside its read."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0  # threads inside a read (each counted once, whatever its depth)
        self._writer: int | None = None  # the thread inside a write
        self._write_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()  # this thread's read depth

    @contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        depth = getattr(self._local, "depth", 0)
        if depth or self._writer == me:  # already inside: never wait on a writer that waits on us
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._write_depth += 1
            else:
                if getattr(self._local, "depth", 0):
                    raise RuntimeError("a reader cannot become a writer: leave the read first")
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._write_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth -= 1
                if not self._write_depth:
                    self._writer = None
                    self._cond.notify_all()


class Guarded:
    """A VectorStore whose writes take the write side of `lock`; reads pass straight through (a reader
    that reads several times holds the read side itself, so it sees one state throughout)."""

    def __init__(self, store, lock: ReadWriteLock):
        self._store = store
        self.lock = lock

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if name not in WRITES:
            return attr

        def write(*args, **kwargs):
            with self.lock.writing():
                return attr(*args, **kwargs)

        return write
