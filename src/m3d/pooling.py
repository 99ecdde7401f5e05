"""Pooling: many per-view vectors -> one unit vector per object.

Works on torch tensors on whatever device the encoder used, so pooling never forces a copy to the
host. Input (objects, views, dim) float; output (objects, dim) float32, L2-normalised (cosine = dot).
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


POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": mean_pool,
    "max": max_pool,
    "attn": attention_pool,
}


def pool(name: str, views: torch.Tensor) -> torch.Tensor:
    """Pool (objects, views, dim) with the named pool and L2-normalise, in float32."""
    import torch

    pooled = POOLS[name](views.float())
    return torch.nn.functional.normalize(pooled, dim=-1)
