"""Exact similarity between queries and stored rows: cosine for plain vectors, MaxSim for multivectors.

A multivector collection stores each object as `views` unit vectors of D dims, kept as one flat row
of views x D (the FAISS file's layout). Its score against a query of m unit vectors is MaxSim, the
comparator Qdrant applies natively: for each query vector the best-matching stored view, summed over
the query's vectors. m3d shows that sum divided by m (the mean best match), so a score stays within
[-1, 1] whether the query is one picture or a mesh's twelve views, and a threshold means the same for
both. Computed in chunks so memory stays bounded (904 objects x 12 views never needs more than
BUDGET floats at a time).
"""

from __future__ import annotations

import numpy as np

#: Floats of one chunk's view-by-view products (64 MB): chunks of stored rows are sized to fit it.
BUDGET = 16 << 20


def as_multi(queries: np.ndarray, dim: int) -> np.ndarray:
    """Queries as (q, m, dim): a (q, m, dim) array as it is, flat (q, m * dim) rows unfolded."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 3:
        return queries
    if queries.ndim != 2 or queries.shape[1] % dim:
        raise ValueError(f"multivector queries need rows of a multiple of {dim} dims, got {queries.shape}")
    return queries.reshape(len(queries), -1, dim)


def scores(queries: np.ndarray, rows: np.ndarray, views: int = 1) -> np.ndarray:
    """(q, n) similarities of every query with every row. Plain rows (views=1) and (q, d) queries: their
    dot product. Otherwise rows are flat multivectors of `views` x D, queries (q, m, D) or flat
    (q, m * D), and this is the normalised MaxSim (mean over the query's vectors of the best view)."""
    if views == 1 and np.ndim(queries) == 2:
        return np.asarray(queries, dtype=np.float32) @ np.asarray(rows, dtype=np.float32).T
    dim = rows.shape[1] // views
    multi = as_multi(queries, dim)
    q, m = multi.shape[:2]
    flat = multi.reshape(q * m, dim)
    out = np.empty((q, len(rows)), dtype=np.float32)
    step = max(1, BUDGET // max(1, q * m * views))
    for lo in range(0, len(rows), step):
        chunk = np.asarray(rows[lo:lo + step], dtype=np.float32).reshape(-1, dim)  # (c * views, D)
        best = (flat @ chunk.T).reshape(q, m, -1, views).max(axis=3)  # (q, m, c): each query view's best match
        out[:, lo:lo + step] = best.mean(axis=1)
    return out


def knn(queries: np.ndarray, rows: np.ndarray, k: int, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (q, k) and row numbers (q, k) of the k best rows per query, best first (ties in row
    order); queries go in groups whose (group, n) score matrix fits BUDGET."""
    k = min(k, len(rows))
    step = max(1, BUDGET // max(1, len(rows)))
    found, where = [], []
    for lo in range(0, len(queries), step):
        sims = scores(queries[lo:lo + step], rows, views)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
            np.tile(np.arange(k), (len(sims), 1))
        order = np.lexsort((top, -np.take_along_axis(sims, top, axis=1)), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        found.append(np.take_along_axis(sims, top, axis=1))
        where.append(top)
    if not found:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(found), np.concatenate(where)
