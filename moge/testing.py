"""Assertion helpers for users' own routing-balance tests, and a Monte-Carlo IS estimate.

Legend: T tokens, E experts, K experts per token, M groups, R trials.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from moge.routing import RouterSettings, route


def _as_ids(expert_ids: Tensor, num_experts: int) -> Tensor:
    if expert_ids.dim() != 2:
        raise AssertionError(f"expert_ids: expected [tokens, top_k], got shape {tuple(expert_ids.shape)}")
    if expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            bad = lo if lo < 0 else hi
            raise AssertionError(f"expert_ids: id {bad} is outside 0..{num_experts - 1}")
    return expert_ids.long()


def assert_group_quota(expert_ids: Tensor, num_experts: int, num_groups: int, top_k: int) -> None:
    """Fail unless every token took exactly top_k/num_groups distinct experts per group.

    expert_ids [T, K]. The message names the first offending token and group.
    """
    if num_experts % num_groups or top_k % num_groups:
        raise ValueError(f"num_groups: {num_groups} must divide num_experts={num_experts} and top_k={top_k}")
    ids_TK = _as_ids(expert_ids, num_experts)
    if ids_TK.shape[1] != top_k:
        raise AssertionError(f"expert_ids: {ids_TK.shape[1]} experts per token, expected top_k={top_k}")
    quota, per_group = top_k // num_groups, num_experts // num_groups
    group_TK = ids_TK // per_group
    counts_TM = torch.zeros(ids_TK.shape[0], num_groups, dtype=torch.long, device=ids_TK.device)
    counts_TM.scatter_add_(1, group_TK, torch.ones_like(group_TK))
    bad = (counts_TM != quota).nonzero()
    if bad.numel():
        t, g = bad[0].tolist()
        chosen = ids_TK[t][group_TK[t] == g].tolist()
        raise AssertionError(
            f"token {t}: group {g} got {counts_TM[t, g].item()} experts {chosen}, expected "
            f"{quota} (top_k={top_k} / num_groups={num_groups}); {bad.shape[0]} (token, group) pairs are off"
        )
    sorted_TK = ids_TK.sort(dim=1).values
    dup = (sorted_TK[:, 1:] == sorted_TK[:, :-1]).any(dim=1).nonzero()
    if dup.numel():
        t = dup[0].item()
        raise AssertionError(f"token {t}: the same expert was chosen twice: {ids_TK[t].tolist()}")


def assert_balanced(load: Tensor, tolerance: float) -> None:
    """Fail if any entry of `load` deviates from the mean by more than tolerance * mean.

    load [E] (per expert, per group or per device). tolerance 0.1 allows +-10%.
    """
    load_f = load.detach().double().reshape(-1)
    if load_f.numel() == 0:
        raise AssertionError("load: empty")
    mean = load_f.mean().item()
    if mean == 0:
        raise AssertionError("load: every entry is 0, nothing was routed")
    dev = (load_f - mean).abs() / mean
    worst = int(dev.argmax())
    if dev[worst] > tolerance:
        raise AssertionError(
            f"entry {worst} has load {load_f[worst].item():g}, {dev[worst].item():.1%} from the mean "
            f"{mean:g} (tolerance {tolerance:.1%}); load = {load_f.tolist()}"
        )


@dataclass
class ImbalanceEstimate:
    """Monte-Carlo distribution of the Imbalance Score over random batches."""

    prob_positive: float  # P(IS > 0)
    mean: float
    std: float
    max: float
    trials: int


@torch.no_grad()
def expected_imbalance(
    num_experts: int,
    top_k: int,
    num_devices: int,
    tokens: int,
    router: str = "global",
    *,
    trials: int = 2000,
    seed: int = 0,
    num_groups: int | None = None,
    topk_groups: int | None = None,
) -> ImbalanceEstimate:
    """IS (Eq. 3) of batches of `tokens` tokens with i.i.d. uniform random scores.

    Reproduces the paper's Fig. 2b: E=64, K=8, 8 devices, 16 tokens -> P(IS > 0) is
    nearly 1 for router="global", exactly 0 for router="grouped". Groups default to
    one per device (num_groups = num_devices).
    """
    M = num_groups or num_devices
    settings = RouterSettings(router=router, top_k=top_k, num_groups=M, topk_groups=topk_groups)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(trials * tokens, num_experts, generator=gen)
    _, ids = route(scores, settings)
    ids_RX = rearrange(ids, "(r t) k -> r (t k)", r=trials)
    device_RX = ids_RX // (num_experts // num_devices)
    load_RN = torch.zeros(trials, num_devices, dtype=torch.long).scatter_add_(
        1, device_RX, torch.ones_like(device_RX)
    )
    is_R = (load_RN.max(dim=1).values - load_RN.min(dim=1).values).double() / tokens
    return ImbalanceEstimate(
        prob_positive=float((is_R > 0).double().mean()),
        mean=float(is_R.mean()),
        std=float(is_R.std(unbiased=False)),
        max=float(is_R.max()),
        trials=trials,
    )
