"""Routers as pure functions: (scores, settings) -> (weights [T, K], expert_ids [T, K]).

Legend: T tokens, E experts, M groups, G experts per group (E / M), K experts per
token, V vocabulary.

Every router selects on `scores + bias` (bias: the aux-loss-free balancing offset, or
None) but returns the *unbiased* scores of the selected experts as weights, as in
DeepSeek-V3. Ties go to the lower expert id: selection uses a stable descending sort,
never `torch.topk`, whose order among equal values is unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

ROUTER_NAMES = ("grouped", "global", "group_limited", "random")
# Routers that take a fixed number of experts from every group: static expert-parallel splits.
QUOTA_ROUTERS = ("grouped", "random")


# --- selection primitives ---------------------------------------------------------


def _stable_topk_indices(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries along the last dim, ties to the lower index.

    values [..., N] -> [..., k] int64, ordered by descending value.
    """
    if k == 1:
        # max(dim) returns the first maximum: the same tie rule, without a sort. On CPU it
        # runs ~4x faster than argmax over a short last dim (a group's G scores).
        return values.max(dim=-1, keepdim=True).indices
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def _with_bias(scores: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return scores
    # One offset per expert: a [1] or [T, E] bias would broadcast and select silently.
    if bias.shape != scores.shape[1:]:
        raise ValueError(
            f"bias: expected ({scores.shape[1]},), one offset per expert, got {tuple(bias.shape)}"
        )
    return scores + bias


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores: expected [tokens, experts], got shape {tuple(scores.shape)}")


def _check_topk(top_k: int, num_experts: int) -> None:
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k: must be in 1..{num_experts} (num_experts), got {top_k}")


def _check_groups(num_experts: int, num_groups: int, top_k: int, *, quota: bool) -> None:
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups: {num_groups} groups do not divide num_experts={num_experts}")
    if quota and top_k % num_groups:
        raise ValueError(
            f"top_k: {top_k} is not a multiple of num_groups={num_groups}; the grouped "
            "router takes top_k/num_groups experts from every group"
        )


# --- the routers --------------------------------------------------------------------


def grouped_topk(
    scores: Tensor, top_k: int, num_groups: int, *, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """MoGE: the top top_k/num_groups experts inside every group (Eq. 6 of the paper).

    scores [T, E] -> weights [T, K] (entries of `scores`), expert_ids [T, K] int64,
    ordered group by group (group 0 first), by descending score within a group.
    Every group receives exactly T * K / M token-slots.
    """
    _check_scores(scores)
    E = scores.shape[1]
    _check_topk(top_k, E)
    _check_groups(E, num_groups, top_k, quota=True)
    per_group, G = top_k // num_groups, E // num_groups
    # Selection carries no gradient (the gates are gathered below): off the graph, the
    # max or sort records no backward.
    sel_TMG = _with_bias(scores.detach(), bias).reshape(scores.shape[0], num_groups, G)
    if per_group == 1:
        # K == M (Pangu Pro MoE): each group's first maximum, offset to a global id, is
        # already [T, K]; one arange gives the group offsets.
        local_TM = sel_TMG.max(dim=-1).indices
        ids_TK = local_TM + torch.arange(0, E, G, device=scores.device)
    else:
        local_TMk = _stable_topk_indices(sel_TMG, per_group)
        offsets_M1 = torch.arange(0, E, G, device=scores.device).unsqueeze(-1)
        ids_TK = rearrange(local_TMk + offsets_M1, "t m k -> t (m k)")
    return scores.gather(1, ids_TK), ids_TK


def global_topk(scores: Tensor, top_k: int, *, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain top-k over all experts (Switch, Mixtral): the baseline MoGE fixes.

    scores [T, E] -> weights [T, K], expert_ids [T, K], by descending score.
    """
    _check_scores(scores)
    _check_topk(top_k, scores.shape[1])
    ids_TK = _stable_topk_indices(_with_bias(scores, bias), top_k)
    return scores.gather(1, ids_TK), ids_TK


def _group_scores(sel_TMG: Tensor, group_score: str) -> Tensor:
    if group_score == "max":
        return sel_TMG.amax(dim=-1)
    if group_score == "top2_sum":
        return torch.topk(sel_TMG, 2, dim=-1).values.sum(dim=-1)
    raise ValueError(f"group_score: expected one of max, top2_sum; got {group_score!r}")


def group_limited_topk(
    scores: Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    group_score: str = "top2_sum",
    *,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3: keep the `topk_groups` best groups, then a global top-k inside them.

    Groups are ranked by the sum of their two best (biased) scores, or by their max.
    Unlike MoGE a token may still take all K experts from one group.
    scores [T, E] -> weights [T, K], expert_ids [T, K], by descending score.
    """
    _check_scores(scores)
    E = scores.shape[1]
    _check_topk(top_k, E)
    _check_groups(E, num_groups, top_k, quota=False)
    G = E // num_groups
    if not 1 <= topk_groups <= num_groups or topk_groups * G < top_k:
        raise ValueError(
            f"topk_groups: must be in 1..{num_groups} and hold at least top_k={top_k} "
            f"experts ({G} per group), got {topk_groups}"
        )
    if group_score == "top2_sum" and G < 2:
        raise ValueError(f"group_score: top2_sum needs at least 2 experts per group, got {G}; use max")
    sel_TE = _with_bias(scores, bias)
    sel_TMG = rearrange(sel_TE, "t (m g) -> t m g", m=num_groups)
    keep_TM = _stable_topk_indices(_group_scores(sel_TMG, group_score), topk_groups)
    mask_TM = torch.zeros(sel_TMG.shape[:2], dtype=torch.bool, device=scores.device)
    mask_TM.scatter_(1, keep_TM, True)
    mask_TE = mask_TM.repeat_interleave(G, dim=1)
    masked_TE = sel_TE.masked_fill(~mask_TE, float("-inf"))
    ids_TK = _stable_topk_indices(masked_TE, top_k)
    return scores.gather(1, ids_TK), ids_TK


def make_random_routing_table(
    vocab_size: int, num_experts: int, num_groups: int, top_k: int, seed: int
) -> Tensor:
    """PanGu-Sigma's Random Routed Experts map: token id -> K/M experts in every group.

    Fixed at construction from `seed`, learned by nothing. Returns [V, K] int64 on the
    CPU, group by group, ascending within a group, distinct experts within a group.
    """
    _check_topk(top_k, num_experts)
    _check_groups(num_experts, num_groups, top_k, quota=True)
    G, per_group = num_experts // num_groups, top_k // num_groups
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Ranking i.i.d. uniforms gives a uniformly random subset for every (token, group).
    noise_VMG = torch.rand(vocab_size, num_groups, G, generator=gen, device="cpu")
    local_VMk = noise_VMG.argsort(dim=-1)[..., :per_group].sort(dim=-1).values
    offsets_M1 = torch.arange(num_groups, device="cpu").unsqueeze(-1) * G
    return rearrange(local_VMk + offsets_M1, "v m k -> v (m k)")


def random_routed(scores: Tensor, token_ids: Tensor, table_VK: Tensor) -> tuple[Tensor, Tensor]:
    """Random Routed Experts: expert ids looked up by token id; weights are their scores.

    scores [T, E], token_ids [T] int64 in [0, V), table_VK [V, K] -> weights [T, K],
    expert_ids [T, K]. Keeping the (learned) scores as gates lets the router still
    learn how much each expert contributes; with normalize_weights and K=1 the gate is 1.
    """
    _check_scores(scores)
    if token_ids.shape != scores.shape[:1]:
        raise ValueError(
            f"token_ids: expected shape ({scores.shape[0]},) to match the tokens, got {tuple(token_ids.shape)}"
        )
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids: expected integer ids, got {token_ids.dtype} (never truncated)")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= table_VK.shape[0]):
        raise ValueError(f"token_ids: ids must be in [0, {table_VK.shape[0]}) (rre_vocab_size)")
    ids_TK = table_VK.index_select(0, token_ids.long())
    return scores.gather(1, ids_TK), ids_TK


# --- scores and the whole routing step ----------------------------------------------


def compute_scores(logits: Tensor, score_func: str) -> Tensor:
    """Router probabilities in float32 (float64 for float64 logits): softmax over all
    experts (Eq. 5) or sigmoid."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"score_func: expected one of softmax, sigmoid; got {score_func!r}")


@dataclass(frozen=True)
class RouterSettings:
    """Everything a router needs besides the scores (a subset of MoGEConfig)."""

    router: str
    top_k: int
    num_groups: int
    topk_groups: int | None = None
    group_score: str = "top2_sum"
    normalize_weights: bool = False
    route_scale: float = 1.0


def select_experts(
    scores: Tensor,
    settings: RouterSettings,
    *,
    bias: Tensor | None = None,
    token_ids: Tensor | None = None,
    table_VK: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Dispatch to the configured router. scores [T, E] -> (weights [T, K], ids [T, K])."""
    s = settings
    if s.router == "grouped":
        return grouped_topk(scores, s.top_k, s.num_groups, bias=bias)
    if s.router == "global":
        return global_topk(scores, s.top_k, bias=bias)
    if s.router == "group_limited":
        if s.topk_groups is None:
            raise ValueError("topk_groups: the group_limited router needs topk_groups")
        return group_limited_topk(scores, s.top_k, s.num_groups, s.topk_groups, s.group_score, bias=bias)
    if s.router == "random":
        if token_ids is None or table_VK is None:
            raise ValueError("token_ids: the random router needs the token ids of the input")
        return random_routed(scores, token_ids, table_VK)
    raise ValueError(f"router: expected one of {', '.join(ROUTER_NAMES)}; got {s.router!r}")


def finalize_weights(weights_TK: Tensor, normalize: bool, route_scale: float) -> Tensor:
    """Optional renormalisation over the K selected experts, then the constant scale."""
    if normalize:
        # The epsilon only guards all-zero sigmoid rows; softmax rows are positive.
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if route_scale != 1.0:
        weights_TK = weights_TK * route_scale
    return weights_TK


def route(
    scores: Tensor,
    settings: RouterSettings,
    *,
    bias: Tensor | None = None,
    token_ids: Tensor | None = None,
    table_VK: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Selection then gate post-processing. scores [T, E] -> (weights [T, K], ids [T, K])."""
    weights_TK, ids_TK = select_experts(scores, settings, bias=bias, token_ids=token_ids, table_VK=table_VK)
    return finalize_weights(weights_TK, settings.normalize_weights, settings.route_scale), ids_TK
