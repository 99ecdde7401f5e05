"""Pooling: many per-view vectors -> one unit vector per object, or (pool "views") every view kept.

Works on torch tensors on whatever device the encoder used, so pooling never forces a copy to the
host. Input (objects, views, dim) float; output (objects, dim) float32, L2-normalised (cosine = dot).
The views pool keeps (objects, views, dim), each view L2-normalised: one Qdrant multivector per
object, compared by MaxSim (m3d.maxsim).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

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


POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": mean_pool,
    "max": max_pool,
    "attn": attention_pool,
    "views": keep_views,
}

#: Pools whose objects are multivectors (views x dim), stored with Qdrant's MaxSim comparator.
MULTIVECTOR = frozenset({"views"})


def pool(name: str, views: torch.Tensor, slots: int | None = None) -> torch.Tensor:
    """Pool (objects, views, dim) with the named pool and L2-normalise, in float32. A multivector pool
    with `slots` fills each object up to that many views by repeating its own views in order (an
    object some cameras did not see): a repeated view changes no MaxSim score against the object,
    and every stored point of a collection keeps the same shape."""
    import torch

    pooled = torch.nn.functional.normalize(POOLS[name](views.float()), dim=-1)
    if name in MULTIVECTOR and slots is not None and pooled.shape[1] != slots:
        pooled = pooled[:, torch.arange(slots, device=pooled.device) % pooled.shape[1]]
    return pooled
