"""Expert capacity and token dropping (Switch, GShard, Megatron, Tutel), as pure functions.

Legend: T tokens, K experts per token, E experts, M groups, S = T * K token-slots.

A capacity factor cf gives every bucket (an expert, or a group of experts = a device)
room for ceil(cf * S / buckets) slots, S counting only real (unpadded) tokens. When a
bucket receives more, it keeps its slots of highest router score and drops the rest:
the lowest score goes first; between equal scores the later token goes first. A
dropped slot's gate becomes 0, so its expert adds nothing and the token keeps only its
other experts, the shared experts and the residual. Nothing is dropped without a
capacity factor (dropless, the default).

Under the grouped router (MoGE) every group receives exactly S / M slots, so a
capacity factor >= 1 per group never drops: the balance is there by construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bucket_capacity(num_slots: int, num_buckets: int, factor: float) -> int:
    """Slots one bucket may take: ceil(factor * num_slots / num_buckets)."""
    if factor <= 0:
        raise ValueError(f"capacity_factor: must be > 0, got {factor}")
    # round() first: 1.0 * 48 / 8 must give 6, not 7 from a float error above 6; but a
    # positive share below the rounding (a tiny factor) is still ceil() = 1, not 0.
    share = factor * num_slots / num_buckets
    return max(math.ceil(round(share, 9)), 1 if share > 0 else 0)


def keep_within_capacity(
    priority_TK: Tensor, bucket_TK: Tensor, num_buckets: int, capacity: int, valid_T: Tensor | None = None
) -> Tensor:
    """Which slots survive: in every bucket the `capacity` slots of highest priority.

    priority_TK [T, K] float (the router score of each slot), bucket_TK [T, K] int64 in
    [0, num_buckets), valid_T [T] bool (False: a padded token, which takes no room and is
    never kept) -> keep_TK [T, K] bool. Ties: the earlier token (then the earlier slot)
    is kept. Deterministic: two stable sorts, no atomics.
    """
    T, K = bucket_TK.shape
    bucket_S = bucket_TK.reshape(-1)
    if valid_T is not None:  # padded slots go to an extra bucket that is never kept
        valid_S = valid_T.repeat_interleave(K)
        bucket_S = torch.where(valid_S, bucket_S, num_buckets)
    # Sort by descending priority (stable: ties keep token order), then stably by bucket:
    # inside each bucket the slots are then in priority order.
    by_priority = torch.sort(priority_TK.reshape(-1), descending=True, stable=True).indices
    order = by_priority[torch.sort(bucket_S[by_priority], stable=True).indices]
    counts = torch.bincount(bucket_S, minlength=num_buckets + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(T * K, device=bucket_S.device) - starts[bucket_S[order]]
    rank_S = torch.empty_like(rank_sorted)
    rank_S[order] = rank_sorted
    keep_S = (rank_S < capacity) & (bucket_S < num_buckets)
    return keep_S.view(T, K)
