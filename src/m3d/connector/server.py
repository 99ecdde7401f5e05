"""A Qdrant server (REST or gRPC, optional API key) through the official qdrant-client.

`url=":memory:"` gives qdrant-client's in-process mode with the same API, which the tests use to run
this code path without a server. Transient failures (connection refused, timeouts, 5xx) are retried
with exponential backoff, each retry announced with how long it will keep trying, then reported as one
line; every call is bounded by its timeout (a server that accepts and never answers costs
RETRIES x TIMEOUT_S plus the backoff, ~32 s, not minutes). An answer that is not Qdrant's JSON is one
line at once. The API key never appears in messages.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import numpy as np

from ..errors import StoreError, UsageError
from ..schemas import INDEXED_KEYWORDS
from . import Hit, Record

T = TypeVar("T")
PAGE = 1024
RETRIES = 3
BACKOFF_S = 0.5
TIMEOUT_S = 10  # connect and read, per call

log = logging.getLogger("m3d")


def _public_location(url: str) -> str:
    """The URL without user info, so nothing secret reaches the terminal or reports."""
    parts = urlsplit(url)
    if url == ":memory:" or not parts.scheme or not parts.hostname:
        return url.rsplit("@", 1)[-1]
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class ServerStore:
    def __init__(self, url: str, *, api_key: str | None = None, retries: int = RETRIES, backoff_s: float = BACKOFF_S,
                 timeout_s: int = TIMEOUT_S):
        """url: http(s)://host[:port] for REST, grpc://host[:port] (default port 6334) for gRPC, or :memory:."""
        from qdrant_client import QdrantClient

        self.location = f"Qdrant server at {_public_location(url)}"
        self._api_key = api_key
        self._retries = retries
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._local = url == ":memory:"
        if self._local:
            self.client = QdrantClient(location=":memory:")
            return
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "grpc") or not parts.hostname:
            raise UsageError(f"--qdrant-url {_public_location(url)!r} is not a Qdrant URL: use http://host:6333, "
                             "https://host or grpc://host:6334")
        if parts.scheme == "grpc":
            self.client = QdrantClient(host=parts.hostname, grpc_port=parts.port or 6334, prefer_grpc=True,
                                       https=False, api_key=api_key, timeout=timeout_s, check_compatibility=False)
        else:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=timeout_s, check_compatibility=False)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn, retrying transient failures with exponential backoff (each retry said on stderr)."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        delay, started = self._backoff_s, time.monotonic()
        for attempt in range(1, self._retries + 1):
            try:
                return fn()
            except UnexpectedResponse as exc:
                if exc.status_code is not None and exc.status_code < 500:
                    raise StoreError(f"{self.location}: {what} refused: {self._clean(exc)}") from None
                error = exc
            except ValueError as exc:  # undecodable bytes, not JSON, not Qdrant's schema: not transient
                raise StoreError(f"{self.location}: {what}: the answer is not a Qdrant server's "
                                 f"({type(exc).__name__}); is this URL a Qdrant server?") from None
            except (ResponseHandlingException, ConnectionError, TimeoutError, OSError) as exc:
                error = exc
            except Exception as exc:  # grpc errors have no common import-free base
                if type(exc).__module__.startswith("grpc"):
                    error = exc
                else:
                    raise
            if attempt < self._retries:
                left = (self._retries - attempt) * self._timeout_s + delay * (2 ** (self._retries - attempt) - 1)
                log.warning("%s: %s: %s; retrying in %.1f s (gives up within about %.0f s)", self.location, what,
                            self._clean(error), delay, left)
                time.sleep(delay)
                delay *= 2
        raise StoreError(f"{self.location}: {what} failed after {self._retries} tries over "
                         f"{time.monotonic() - started:.0f} s ({self._timeout_s} s timeout each): {self._clean(error)}")

    def _clean(self, exc: Exception) -> str:
        text = (str(exc).splitlines() or [type(exc).__name__])[0]
        return text.replace(self._api_key, "***") if self._api_key else text

    # -- collections -------------------------------------------------------------------------
    def collections(self) -> list[str]:
        return sorted(c.name for c in self._call("list collections", self.client.get_collections).collections)

    def dim(self, name: str) -> int:
        info = self._call(f"read collection {name}", lambda: self.client.get_collection(name))
        return int(info.config.params.vectors.size)

    def ensure_collection(self, name: str, dim: int) -> None:
        from qdrant_client import models

        if name in self.collections():
            if self.dim(name) != dim:
                raise StoreError(f"collection {name} holds {self.dim(name)}-d vectors, not {dim}-d")
            return
        self._call(
            f"create collection {name}",
            lambda: self.client.create_collection(
                name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
            ),
        )
        for key in INDEXED_KEYWORDS:
            self._call(
                f"index {key} of {name}",
                lambda key=key: self.client.create_payload_index(name, key, models.PayloadSchemaType.KEYWORD),
            )

    def drop_collection(self, name: str) -> None:
        self._call(f"drop collection {name}", lambda: self.client.delete_collection(name))

    # -- points ------------------------------------------------------------------------------
    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        from qdrant_client import models

        points = models.Batch(ids=list(ids), vectors=np.asarray(vectors, np.float32).tolist(), payloads=payloads)
        self._call(f"upsert into {name}", lambda: self.client.upsert(name, points=points, wait=True))

    def require_space(self, need: int = 0) -> None:
        """The server minds its own disk (and says so in its answers)."""

    def set_payload(self, name: str, payloads: dict[str, dict]) -> None:
        for pid, keys in payloads.items():
            self._call(f"set payload in {name}",
                       lambda pid=pid, keys=keys: self.client.set_payload(name, payload=keys, points=[pid], wait=True))

    def delete(self, name: str, ids: list[str]) -> None:
        from qdrant_client import models

        if ids:
            selector = models.PointIdsList(points=list(ids))
            self._call(f"delete from {name}", lambda: self.client.delete(name, points_selector=selector, wait=True))

    def count(self, name: str) -> int:
        return self._call(f"count {name}", lambda: self.client.count(name, exact=True)).count

    def records(self, name: str, *, fields: list[str] | None = None, vectors: bool = False) -> Iterator[Record]:
        offset = None
        while True:
            page, offset = self._call(
                f"scroll {name}",
                lambda offset=offset: self.client.scroll(
                    name, offset=offset, limit=PAGE, with_payload=fields if fields else True, with_vectors=vectors
                ),
            )
            for point in page:
                vector = np.asarray(point.vector, np.float32) if vectors else None
                yield Record(str(point.id), point.payload or {}, vector)
            if offset is None:
                return

    def retrieve(self, name: str, ids: list[str]) -> list[Record]:
        found = self._call(f"retrieve from {name}", lambda: self.client.retrieve(name, ids=list(ids)))
        by_id = {str(p.id): Record(str(p.id), p.payload or {}) for p in found}
        return [by_id[i] for i in ids if i in by_id]

    def search(self, name: str, queries: np.ndarray, k: int, *, label: str | None = None) -> list[list[Hit]]:
        from qdrant_client import models

        flt = None
        if label is not None:
            flt = models.Filter(must=[models.FieldCondition(key="class", match=models.MatchValue(value=label))])
        requests = [
            models.QueryRequest(query=vec, limit=k, filter=flt, with_payload=True)
            for vec in np.asarray(queries, np.float32).tolist()
        ]
        answers = self._call(f"search {name}", lambda: self.client.query_batch_points(name, requests=requests))
        return [[Hit(str(p.id), float(p.score), p.payload or {}) for p in a.points] for a in answers]

    def facet(self, name: str, key: str) -> dict[str, int]:
        response = self._call(f"facet {name}", lambda: self.client.facet(name, key, limit=100_000, exact=True))
        return {str(hit.value): int(hit.count) for hit in response.hits}

    def flush(self) -> None:
        """Writes are acknowledged with wait=True; nothing is buffered here."""

    def _missing_indexes(self, name: str) -> list[str]:
        if self._local:  # qdrant-client's in-process mode keeps no payload indexes at all
            return []
        info = self._call(f"read collection {name}", lambda: self.client.get_collection(name))
        return [key for key in INDEXED_KEYWORDS if key not in (info.payload_schema or {})]

    def problems(self, name: str) -> list[str]:
        missing = self._missing_indexes(name)
        return [f"collection {name} has no payload index on {', '.join(missing)}: `m3d check --repair` builds it"] \
            if missing else []

    def repair(self, name: str) -> list[str]:
        from qdrant_client import models

        missing = self._missing_indexes(name)
        for key in missing:
            self._call(f"index {key} of {name}",
                       lambda key=key: self.client.create_payload_index(name, key, models.PayloadSchemaType.KEYWORD))
        return [f"built payload index on {', '.join(missing)}"] if missing else []

    def set_aside(self, name: str, where) -> None:
        raise StoreError(f"{self.location}: collection {name} cannot be read; a server's collections are not moved "
                         "from here: drop it on the server, then run `m3d sync` to rebuild it")

    def close(self) -> None:
        self.client.close()
