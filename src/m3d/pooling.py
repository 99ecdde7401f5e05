"""Pooling: many per-view vectors -> one unit vector per object, or (pool "views") every view kept.

Works on torch tensors on whatever device the encoder used, so pooling never forces a copy to the
host. Input (objects, views, dim) float; output (objects, dim) float32, L2-normalised (cosine = dot).
The views pool keeps (objects, views, dim), each view L2-normalised: one Qdrant multivector per
object, compared by MaxSim (m3d.maxsim). The ring pool keeps (objects, views, views x RING_DIMS): every
cyclic order of the ring's views, reduced and side by side, so MaxSim picks the best turn about the
up axis (the Light Field Descriptor's matching rule).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # torch is imported where pooling runs, so naming the pools (option checks) stays instant
    import torch


def mean_pool(views: torch.Tensor) -> torch.Tensor:
    return views.mean(dim=1)


def max_pool(views: torch.Tensor) -> torch.Tensor:
    return views.amax(dim=1)


def attention_pool(views: torch.Tensor) -> torch.Tensor:
    """Softmax attention over views with the mean view as the query (no learned weights, so
    deterministic): views that agree with the consensus shape weigh more than odd angles."""
    import torch

    query = views.mean(dim=1, keepdim=True)  # (objects, 1, dim)
    scores = (views * query).sum(dim=-1) / math.sqrt(views.shape[-1])  # (objects, views)
    weights = torch.softmax(scores, dim=1).unsqueeze(-1)
    return (weights * views).sum(dim=1)


def keep_views(views: torch.Tensor) -> torch.Tensor:
    """Every view's vector kept, for late interaction: a query view is matched with the object's view
    that resembles it most, instead of with an average over angles it was never seen from."""
    return views


#: Dims each view of the ring pool is reduced to: its multivector holds views x views x RING_DIMS
#: floats (8 views: 64 KB per object, whatever the encoder's dim; measured on LPSB hog: 128 dims lost to the
#: views pool, 256 beat it, see docs/multiview.md).
RING_DIMS = 256


@lru_cache(maxsize=8)
def _projection(dim: int) -> np.ndarray:
    """A fixed Gaussian projection of dim -> RING_DIMS (seeded: the same on every machine, fitted on
    nothing, so no dataset and no label shapes it); cosines survive it up to ~1/sqrt(RING_DIMS)."""
    return np.random.default_rng(dim).standard_normal((dim, RING_DIMS)).astype(np.float32)


def ring_orders(views: torch.Tensor) -> torch.Tensor:
    """Every cyclic order of a ring's views, each view reduced (RING_DIMS) and unit, concatenated:
    (objects, V, V x RING_DIMS). MaxSim of one order against these is its best yaw shift's mean cosine."""
    import torch

    reduced = torch.nn.functional.normalize(views @ torch.from_numpy(_projection(views.shape[-1])).to(views), dim=-1)
    return torch.stack([torch.roll(reduced, -shift, dims=1).flatten(1) for shift in range(views.shape[1])], dim=1)


POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": mean_pool,
    "max": max_pool,
    "attn": attention_pool,
    "views": keep_views,
    "ring": ring_orders,
}

#: Pools whose objects are multivectors (several vectors a point), stored with Qdrant's MaxSim comparator.
MULTIVECTOR = frozenset({"views", "ring"})
#: Multivector pools that need every view of the ring in order: their queries are filled as points are.
ORDERED = frozenset({"ring"})


def vector_dim(name: str, encoder_dim: int, views: int) -> int:
    """Dims of one stored vector of a pool's collection."""
    return views * RING_DIMS if name == "ring" else encoder_dim


def pool(name: str, views: torch.Tensor, slots: int | None = None) -> torch.Tensor:
    """Pool (objects, views, dim) with the named pool and L2-normalise, in float32. A multivector pool
    with `slots` fills each object up to that many views by repeating its own views in order (an
    object some cameras did not see): a repeated view changes no views-pool MaxSim score against the
    object, and every stored point of a collection keeps the same shape (the ring pool's orders then
    only approximate the ring)."""
    import torch

    views = views.float()
    if name in MULTIVECTOR and slots is not None and views.shape[1] != slots:
        views = views[:, torch.arange(slots, device=views.device) % views.shape[1]]
    return torch.nn.functional.normalize(POOLS[name](views), dim=-1)
