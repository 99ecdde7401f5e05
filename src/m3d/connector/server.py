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
from . import PAGE, VECTOR_PAGE, VERSION, Hit, IndexInfo, IndexSettings, Record, SearchSettings, multi_score, shape_text

T = TypeVar("T")
RETRIES = 3
BACKOFF_S = 0.5
GENERATION_KEY = "m3d_generation"
SETTINGS_KEY = "m3d_index"
VIEWS_KEY = "m3d_views"  # vectors per point of a multivector collection
META_PREFIX = "m3d_"  # set_metadata's keys in the collection's metadata
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
    def _physical_names(self) -> set[str]:
        return {c.name for c in self._call("list collections", self.client.get_collections).collections}

    def _aliases(self) -> dict[str, str]:
        found = self._call("list aliases", self.client.get_aliases).aliases
        return {a.alias_name: a.collection_name for a in found}

    def collections(self) -> list[str]:
        """Names readers use: aliases, and plain collections; versions being built stay hidden."""
        physical, aliases = self._physical_names(), self._aliases()
        plain = {p for p in physical if VERSION not in p and p not in aliases}
        return sorted({a for a, t in aliases.items() if t in physical} | (plain - set(aliases.values())))

    def physical(self, name: str) -> str:
        """The collection a name reads from now (its alias target, or itself)."""
        return self._aliases().get(name, name)

    def begin_rebuild(self, name: str) -> str:
        """A fresh version of a collection to fill while readers keep the current one (through the
        alias); versions left by an interrupted rebuild are dropped first."""
        current = self.physical(name)
        versions = [p for p in self._physical_names() if p.startswith(name + VERSION) and p != current]
        for version in versions:
            self._call(f"drop collection {version}", lambda version=version: self.client.delete_collection(version))
        numbers = [int(v.rsplit(VERSION, 1)[1]) for v in [current, *versions] if VERSION in v
                   and v.rsplit(VERSION, 1)[1].isdigit()]
        return f"{name}{VERSION}{max(numbers, default=0) + 1}"

    def publish(self, name: str, version: str) -> None:
        """Move the alias to a complete version in one atomic alias update, then drop the old one. A
        collection from before aliases (a real collection under the name) must go first: readers then
        miss it for the moment between the two calls."""
        from qdrant_client import models

        aliases = self._aliases()
        old = aliases.get(name, name)
        operations = []
        if name in aliases:
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=name)))
        elif name in self._physical_names():
            self._call(f"drop collection {name}", lambda: self.client.delete_collection(name))
        operations.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=version,
                                                                                       alias_name=name)))
        self._call(f"move alias {name}", lambda: self.client.update_collection_aliases(
            change_aliases_operations=operations))
        if old not in (version, name):
            self._call(f"drop collection {old}", lambda: self.client.delete_collection(old))

    def dim(self, name: str) -> int:
        info = self._call(f"read collection {name}", lambda: self.client.get_collection(name))
        return int(info.config.params.vectors.size)

    def views(self, name: str) -> int | None:
        return self._metadata(name).get(VIEWS_KEY)

    def ensure_collection(self, name: str, dim: int, settings: IndexSettings = IndexSettings(),
                          views: int | None = None) -> None:
        from qdrant_client import models

        if name in self._physical_names() | set(self._aliases()):
            if self.dim(name) != dim or self.views(name) != views:
                raise StoreError(f"collection {name} holds {shape_text(self.dim(name), self.views(name))} vectors, "
                                 f"not {shape_text(dim, views)}")
            differences = settings.differences(self.settings(name))
            if differences:
                raise StoreError(f"collection {name} was created with other index settings "
                                 f"({'; '.join(differences)}); run again with --rebuild to re-create it")
            return
        s = settings.resolved()
        kb = s.threshold_kb(dim * (views or 1))
        multi = None if views is None else models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
        quantization = {
            "none": None,
            "int8": lambda: models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
                type=models.ScalarType.INT8, quantile=0.99, always_ram=True)),
            "binary": lambda: models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True)),
        }[s.quantization]
        self._call(
            f"create collection {name}",
            lambda: self.client.create_collection(
                name,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE, on_disk=s.on_disk,
                                                   multivector_config=multi),
                hnsw_config=models.HnswConfigDiff(m=s.hnsw_m, ef_construct=s.hnsw_ef_construct, full_scan_threshold=kb),
                optimizers_config=models.OptimizersConfigDiff(indexing_threshold=kb),
                quantization_config=quantization() if quantization else None,
                shard_number=s.shards, replication_factor=s.replication_factor,
                write_consistency_factor=s.write_consistency,
                metadata={SETTINGS_KEY: s.to_dict(), **({} if views is None else {VIEWS_KEY: views})},
            ),
        )
        for key in INDEXED_KEYWORDS:  # before the first point: the HNSW graph then gets its filter links
            self._call(
                f"index {key} of {name}",
                lambda key=key: self.client.create_payload_index(name, key, models.PayloadSchemaType.KEYWORD, wait=True),
            )

    def settings(self, name: str) -> IndexSettings:
        return IndexSettings.from_dict(self._metadata(name).get(SETTINGS_KEY))

    def _metadata(self, name: str) -> dict:
        info = self._call(f"read collection {name}", lambda: self.client.get_collection(name))
        return info.config.metadata or {}

    def index_info(self, name: str) -> IndexInfo:
        info = self._call(f"read collection {name}", lambda: self.client.get_collection(name))
        return IndexInfo(IndexSettings.from_dict((info.config.metadata or {}).get(SETTINGS_KEY)),
                         int(info.points_count or 0), int(info.indexed_vectors_count or 0))

    def optimize(self, name: str) -> bool:
        """A server builds its indexes in the background once a segment passes the threshold."""
        return False

    def signature(self, name: str) -> None:
        """A server's files are not ours to stat: nothing vouches for a sync manifest, each sync reads the points."""
        return None

    def generation(self, name: str) -> str | None:
        return self._metadata(name).get(GENERATION_KEY)

    def set_generation(self, name: str, token: str) -> None:
        """Collection metadata (Qdrant >= 1.16): every m3d on every machine sees the same token."""
        self._call(f"update collection {name}",
                   lambda: self.client.update_collection(name, metadata={GENERATION_KEY: token}))

    def metadata(self, name: str, key: str) -> object | None:
        return self._metadata(name).get(META_PREFIX + key)

    def set_metadata(self, name: str, key: str, value: object) -> None:
        self._call(f"update collection {name}",
                   lambda: self.client.update_collection(name, metadata={META_PREFIX + key: value}))

    def drop_collection(self, name: str) -> None:
        from qdrant_client import models

        aliases = self._aliases()
        if name in aliases:
            self._call(f"drop alias {name}", lambda: self.client.update_collection_aliases(change_aliases_operations=[
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=name))]))
            self._call(f"drop collection {aliases[name]}", lambda: self.client.delete_collection(aliases[name]))
        if name in self._physical_names():
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
                    name, offset=offset, limit=VECTOR_PAGE if vectors else PAGE,
                    with_payload=fields if fields else True, with_vectors=vectors),
            )
            for point in page:
                vector = np.asarray(point.vector, np.float32) if vectors else None
                yield Record(str(point.id), point.payload or {}, vector)
            if offset is None:
                return

    def retrieve(self, name: str, ids: list[str], *, vectors: bool = False) -> list[Record]:
        found = self._call(f"retrieve from {name}",
                           lambda: self.client.retrieve(name, ids=list(ids), with_vectors=vectors))
        by_id = {str(p.id): Record(str(p.id), p.payload or {}, np.asarray(p.vector, np.float32) if vectors else None)
                 for p in found}
        return [by_id[i] for i in ids if i in by_id]

    def search(self, name: str, queries: np.ndarray, k: int, *, label: str | None = None,
               params: SearchSettings = SearchSettings()) -> list[list[Hit]]:
        from qdrant_client import models

        flt = None
        if label is not None:
            flt = models.Filter(must=[models.FieldCondition(key="class", match=models.MatchValue(value=label))])
        search_params = models.SearchParams(hnsw_ef=params.hnsw_ef, quantization=models.QuantizationSearchParams(
            rescore=params.rescore, oversampling=params.oversampling))
        queries = np.asarray(queries, np.float32)
        requests = [
            models.QueryRequest(query=vec, limit=k, filter=flt, with_payload=True, params=search_params)
            for vec in queries.tolist()
        ]
        answers = self._call(f"search {name}", lambda: self.client.query_batch_points(name, requests=requests))
        return [[Hit(str(p.id), multi_score(float(p.score), queries), p.payload or {}) for p in a.points]
                for a in answers]

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
