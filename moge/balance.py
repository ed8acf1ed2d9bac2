"""Balance losses, the aux-loss-free bias, the Imbalance Score and routing statistics.

Legend: T tokens, E experts, K experts per token, M groups, B sequences, L sequence
length, N devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor


def count_ids(ids_N: Tensor, n: int) -> Tensor:
    """How often each of 0..n-1 occurs in ids_N [N] int64 -> [n] int64.

    torch.bincount on CUDA reads the largest id back to the host to size its output (a
    sync that stalls the queue every call); a scatter-add of ones into [n] does not, and
    integer sums are exact in any order. On CPU bincount is the plain way.
    """
    if ids_N.device.type == "cpu":
        return torch.bincount(ids_N, minlength=n)
    return torch.zeros(n, dtype=torch.int64, device=ids_N.device).scatter_add_(
        0, ids_N, torch.ones_like(ids_N)
    )


def check_expert_ids(expert_ids: Tensor, num_experts: int) -> None:
    """ValueError unless every id lies in 0..num_experts-1 (reads two numbers back to the
    host: for the statistics users call, not for the layer's forward)."""
    if expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"expert_ids: id {lo if lo < 0 else hi} is outside 0..{num_experts - 1} (num_experts={num_experts})"
            )


def expert_load(expert_ids: Tensor, num_experts: int) -> Tensor:
    """Token-slots per expert. expert_ids [T, K] (any shape) -> [E] int64."""
    return count_ids(expert_ids.reshape(-1), num_experts)


# --- balance losses (Eq. 8 of the paper, without its coefficient alpha) -------------


def balance_loss_from_counts(
    scores_TE: Tensor, counts_E: Tensor, num_tokens: int | Tensor, top_k: int
) -> Tensor:
    """sum_i f_i * p_i with f_i = E / (K * num_tokens) * counts_i, p_i = mean_t scores[t, i].

    `counts_E` and `num_tokens` may span more tokens than `scores_TE` (global batch).
    num_tokens may be a 0-dim tensor (>= 1) on counts_E's device, so that it need not be
    read back to the host. f carries no gradient (counts are integers); the gradient
    reaches the router through p. Returns a 0-dim float32 tensor; 0 when there are no tokens.
    """
    if scores_TE.shape[0] == 0 or (isinstance(num_tokens, int) and num_tokens == 0):
        return scores_TE.new_zeros(())
    E = scores_TE.shape[1]
    if isinstance(num_tokens, Tensor):
        f_E = counts_E.to(torch.float32) * (E / top_k) / num_tokens.to(torch.float32)
    else:
        f_E = counts_E.to(torch.float32) * (E / (top_k * num_tokens))
    p_E = scores_TE.float().mean(dim=0)
    return (f_E * p_E).sum()


def global_batch_balance_loss(scores_TE: Tensor, counts_E: Tensor, top_k: int, calls: int) -> Tensor:
    """One call's share of Eq. 8 over a global batch, times the batch's number of calls.

    counts_E [E]: slots per expert over the step's `calls` calls (every micro-batch of
    every rank), N = counts.sum() / K their tokens; scores_TE [T, E]: this call's tokens.
    Returns calls * sum_i f_i * S_i / N with f from counts_E and S_i the sum of this
    call's scores of expert i. The mean over the step's calls (what `loss / grad_accum`
    and the data-parallel gradient mean add up to) is then sum_i f_i * P_i with P the mean
    over all N tokens: Eq. 8 on the whole batch, even with calls of unequal size. With
    calls of equal size it is f . mean(scores) (the factor T * calls / N is 1).
    """
    if scores_TE.shape[0] == 0:
        return scores_TE.new_zeros((), dtype=torch.float32)
    # N stays on the device (reading it back would stall a GPU's queue every call). The
    # clamp only guards all-zero counts, whose loss is 0 either way.
    tokens = (counts_E.sum() // top_k).clamp_min(1)
    share = scores_TE.shape[0] * calls / tokens.to(torch.float32)
    return balance_loss_from_counts(scores_TE, counts_E, tokens, top_k) * share


def load_balancing_loss(scores: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Batch-level balance loss (Eq. 8 without alpha); 1.0 at perfect balance.

    scores [T, E] (full softmax, before selection), expert_ids [T, K] (the selection
    dispatch used: grouped for MoGE) -> 0-dim tensor.
    """
    if scores.dim() != 2 or scores.shape[1] != num_experts:
        raise ValueError(f"scores: expected [tokens, {num_experts}], got {tuple(scores.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != scores.shape[0]:
        raise ValueError(
            f"expert_ids: expected [{scores.shape[0]}, top_k] to match scores, got {tuple(expert_ids.shape)}"
        )
    check_expert_ids(expert_ids, num_experts)
    T, K = expert_ids.shape
    return balance_loss_from_counts(scores, expert_load(expert_ids, num_experts), T, K)


def sequence_load_balancing_loss(
    scores_BLE: Tensor, ids_BLK: Tensor, num_experts: int, mask_BL: Tensor | None = None
) -> Tensor:
    """Sequence-level variant: Eq. 8 inside every sequence, averaged over sequences.

    scores_BLE [B, L, E], ids_BLK [B, L, K], mask_BL [B, L] bool (False: padding, left
    out of f and p; a sequence of padding only is left out of the mean) -> 0-dim tensor.
    Shapes and ids are checked (ValueError naming the argument).
    """
    if scores_BLE.dim() != 3 or scores_BLE.shape[2] != num_experts:
        raise ValueError(
            f"scores: expected [sequences, length, {num_experts}], got {tuple(scores_BLE.shape)}"
        )
    B, L = scores_BLE.shape[:2]
    if ids_BLK.dim() != 3 or ids_BLK.shape[:2] != (B, L):
        raise ValueError(
            f"expert_ids: expected [{B}, {L}, top_k] to match scores, got {tuple(ids_BLK.shape)}"
        )
    if mask_BL is not None and (mask_BL.dtype != torch.bool or mask_BL.shape != (B, L)):
        raise ValueError(
            f"mask_BL: expected a bool tensor of shape {(B, L)}, got {mask_BL.dtype} {tuple(mask_BL.shape)}"
        )
    check_expert_ids(ids_BLK, num_experts)
    return sequence_balance_loss(scores_BLE, ids_BLK, num_experts, mask_BL)


def sequence_balance_loss(
    scores_BLE: Tensor, ids_BLK: Tensor, num_experts: int, mask_BL: Tensor | None = None
) -> Tensor:
    """sequence_load_balancing_loss without its checks, for a dispatch's own selection
    (ids in 0..num_experts-1): an id outside would count in another sequence's f."""
    B, L, K = ids_BLK.shape
    if B == 0 or L == 0:
        return scores_BLE.new_zeros((), dtype=torch.float32)
    if mask_BL is None:
        mask_BL = torch.ones(B, L, dtype=torch.bool, device=ids_BLK.device)
    # Per-sequence counts with one scatter: offset each sequence's ids by b * E; padded
    # slots go to an extra bin past the last sequence's.
    offsets_B11 = torch.arange(B, device=ids_BLK.device).view(B, 1, 1) * num_experts
    flat_BLK = torch.where(mask_BL[..., None], ids_BLK + offsets_B11, B * num_experts)
    counts_BE = torch.bincount(flat_BLK.reshape(-1), minlength=B * num_experts + 1)[:-1]
    real_B1 = mask_BL.sum(dim=1, keepdim=True)
    has_B = real_B1.squeeze(1) > 0
    if not bool(has_B.any()):
        return scores_BLE.new_zeros((), dtype=torch.float32)
    f_BE = counts_BE.view(B, num_experts).float() * num_experts / (K * real_B1.clamp_min(1))
    p_BE = (scores_BLE.float() * mask_BL[..., None]).sum(dim=1) / real_B1.clamp_min(1)
    return (f_BE * p_BE).sum(dim=1)[has_B].mean()


def released_balance_loss(scores: Sequence[Tensor], top_k: int) -> Tensor:
    """The balance loss of the released Pangu Pro MoE code, without its coefficient.

    scores: one [T_l, E] tensor per MoE layer, the full softmax of the router logits.
    The release concatenates every layer's rows into one batch of N = sum T_l rows and
    computes Mixtral's load_balancing_loss_func on it (no padding mask here):

        E * sum_i (c_i / N) * P_i,   c_i = rows whose *global* top-k holds expert i,
                                     P_i = mean over the N rows of the score of expert i.

    It differs from Eq. 8 (`balance_loss_from_counts`, E/K scaling, counts of the
    dispatch actually used) in three ways: the counts come from a global top-k, not the
    grouped selection; the scale is E, not E/K, so on the same counts it is K times
    Eq. 8; and it is one loss over all layers, whose gradient on a layer's scores is
    about 1/L of a per-layer loss. At perfect balance it equals K (Eq. 8: 1 per layer).
    The counts carry no gradient. Returns a 0-dim float32 tensor (0 with no rows).
    """
    if not scores:
        raise ValueError("scores: give at least one layer's [tokens, experts] scores")
    E = scores[0].shape[-1]
    for i, s in enumerate(scores):
        if s.dim() != 2 or s.shape[1] != E:
            raise ValueError(f"scores[{i}]: expected [tokens, {E}], got {tuple(s.shape)}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k: {top_k} must lie in 1..{E}")
    scores_NE = torch.cat([s.float() for s in scores], dim=0)
    N = scores_NE.shape[0]
    if N == 0:
        return scores_NE.new_zeros(())
    with torch.no_grad():
        ids_NK = scores_NE.topk(top_k, dim=-1).indices
        frac_E = expert_load(ids_NK, E).float() / N
    return E * (frac_E * scores_NE.mean(dim=0)).sum()


def released_coefficient(aux_loss_coef: float, aux_loss_type: str, top_k: int, moe_layers: int) -> float:
    """The released code's `router_aux_loss_coef` c for a model of `moe_layers` MoE layers.

    aux_loss_type "released" runs the released objective, so c is aux_loss_coef itself.
    Otherwise the model adds alpha * Eq. 8 for every layer, where the released code takes
    one loss over all layers' rows: on L layers that route alike that loss is K times
    one layer's Eq. 8, so c = alpha * L / K gives the same loss and the same pull on each
    router (alpha / K would match a single layer only). What config.json records.
    """
    if aux_loss_type == "released":
        return aux_loss_coef
    return aux_loss_coef * moe_layers / top_k


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean_t logsumexp(logits_t)^2, keeps logits small. -> 0-dim."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


# --- aux-loss-free balancing (DeepSeek-V3) -------------------------------------------


def update_balance_bias(bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """One sign-rule step: bias_i += rate * sign(mean_load - load_i), then centred.

    The bias only shifts selection. Under the grouped router every group holds the
    same number of slots, so the global mean is also each group's mean: the rule then
    balances experts inside each group. Centring (mean 0) keeps the bias from drifting
    and changes no selection. Returns a new float32 [E] tensor.
    """
    load_E = load_E.to(torch.float32)
    step_E = torch.sign(load_E.mean() - load_E) * rate
    new_E = bias_E.to(torch.float32) + step_E
    return new_E - new_E.mean()


# --- Imbalance Score (Eq. 3) and statistics -------------------------------------------


def device_load(expert_ids: Tensor, num_experts: int, num_devices: int) -> Tensor:
    """Token-slots per device, experts placed on devices in contiguous blocks (the layout
    of moge.distributed.expert_parallel.expert_placement: whole groups per rank). -> [N]."""
    if num_devices < 1 or num_experts % num_devices:
        raise ValueError(f"num_devices: {num_devices} does not divide num_experts={num_experts}")
    check_expert_ids(expert_ids, num_experts)
    load_E = expert_load(expert_ids, num_experts)
    return load_E.view(num_devices, num_experts // num_devices).sum(dim=1)


def imbalance_score(expert_ids: Tensor, num_experts: int, num_devices: int) -> float:
    """IS = (max_i T_i - min_i T_i) / |X| (Eq. 3), T_i the slots on device i, |X| the tokens.

    expert_ids [T, K]. IS ranges over [0, K], not [0, 1]: a device can take all K slots
    of every token (IS = K). 0.0 for an empty batch.
    """
    T = expert_ids.shape[0]
    if T == 0:
        return 0.0
    load_N = device_load(expert_ids, num_experts, num_devices)
    return float(load_N.max() - load_N.min()) / T


@dataclass
class RoutingStats:
    """Load statistics of one routing decision (plain Python values and CPU tensors)."""

    expert_load: Tensor  # [E] int64 token-slots per expert
    group_load: Tensor  # [M] int64 token-slots per group
    imbalance_score: float  # Eq. 3 across groups (one group per device), in [0, K]
    max_over_mean: float  # max expert load / mean expert load (1.0 = perfect)
    cv: float  # coefficient of variation of the expert load
    load_entropy: float  # entropy (nats) of the slot distribution; log(E) = uniform
    score_entropy: float | None  # mean per-token entropy (nats) of the scores, if given
    dead_experts: int  # experts that received no slot
    dropped_fraction: float = 0.0  # share of slots dropped by an expert capacity (0: dropless)

    def as_dict(self) -> dict:
        return {
            "expert_load": self.expert_load.tolist(),
            "group_load": self.group_load.tolist(),
            "imbalance_score": self.imbalance_score,
            "max_over_mean": self.max_over_mean,
            "cv": self.cv,
            "load_entropy": self.load_entropy,
            "score_entropy": self.score_entropy,
            "dead_experts": self.dead_experts,
            "dropped_fraction": self.dropped_fraction,
        }


def load_entropy(load_E: Tensor) -> float:
    """Entropy (nats) of the slot shares of an [E] count vector (log E: uniform); 0 when
    it counts nothing."""
    frac_E = load_E.detach().double().cpu()
    total = float(frac_E.sum())
    if total <= 0:
        return 0.0
    frac_E = frac_E / total
    return float(-(frac_E * frac_E.clamp_min(1e-300).log()).sum())


def load_summary(load_E: Tensor, num_groups: int, tokens: float) -> dict:
    """The statistics of slot counts per expert [E] over `tokens` tokens, experts in
    num_groups contiguous groups (one per device): imbalance_score (Eq. 3, 0 without
    tokens), max_over_mean and cv (nan without slots), load_entropy, dead_experts."""
    if num_groups < 1 or load_E.numel() % num_groups:
        raise ValueError(f"num_groups: {num_groups} does not divide num_experts={load_E.numel()}")
    load_E = load_E.detach().double().cpu()
    mean = float(load_E.mean())
    group_M = rearrange(load_E, "(m g) -> m g", m=num_groups).sum(dim=1)
    return {
        "imbalance_score": float(group_M.max() - group_M.min()) / tokens if tokens > 0 else 0.0,
        "max_over_mean": float(load_E.max()) / mean if mean > 0 else math.nan,
        "cv": float(load_E.std(unbiased=False)) / mean if mean > 0 else math.nan,
        "load_entropy": load_entropy(load_E),
        "dead_experts": int((load_E == 0).sum()),
    }


def score_entropy(scores_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Mean per-token entropy (nats) of the scores [T, E], each row renormalised to sum
    to 1 (so sigmoid scores give a distribution too), over the real tokens (mask_T [T]
    True; None: all). A 0-dim tensor in float32 (float64 for float64 scores), 0 when
    there are no tokens; no host sync without a mask."""
    if mask_T is not None:
        scores_TE = scores_TE[mask_T]
    p_TE = scores_TE.detach()
    p_TE = p_TE if p_TE.dtype == torch.float64 else p_TE.float()
    p_TE = p_TE / p_TE.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    h_T = -(p_TE * p_TE.clamp_min(1e-30).log()).sum(dim=-1)
    return h_T.sum() / max(h_T.numel(), 1)


@torch.no_grad()
def routing_stats(
    expert_ids: Tensor,
    num_experts: int,
    num_groups: int,
    scores: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    dropped: Tensor | None = None,
) -> RoutingStats:
    """Per-expert and per-group load, IS, max/mean, CV, entropies and dead experts.

    expert_ids [T, K], scores [T, E] (optional, for the score entropy), mask [T] bool
    (False: padding, left out of every statistic), dropped [E] slots dropped by a
    capacity (MoGEOutput.dropped; gives dropped_fraction).
    """
    if mask is not None:
        expert_ids = expert_ids[mask]
        scores = None if scores is None else scores[mask]
    check_expert_ids(expert_ids, num_experts)
    load_E = expert_load(expert_ids, num_experts).cpu()
    summary = load_summary(load_E, num_groups, expert_ids.shape[0])  # first: it checks num_groups
    total = int(load_E.sum())
    has_scores = scores is not None and scores.shape[0] > 0
    return RoutingStats(
        expert_load=load_E,
        group_load=rearrange(load_E, "(m g) -> m g", m=num_groups).sum(dim=1),
        **summary,
        score_entropy=float(score_entropy(scores)) if scores is not None and has_scores else None,
        dropped_fraction=0.0 if dropped is None else int(dropped.sum()) / max(total, 1),
    )
