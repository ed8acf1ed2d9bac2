"""PanGu-Sigma's two-level Random Routed Experts (RRE) as pure functions.

Legend: T tokens, V vocabulary, E experts, M groups, G experts per group (E / M),
K experts per token, N domains, n groups per domain, q = K / n experts per group.

Level 1: a token's domain picks its expert groups (a fixed mapping from the config).
Level 2: inside each of those groups a fixed random table maps the token id to q
experts. Nothing is learned and nothing depends on the hidden state, so a domain's
tokens can only ever reach its groups' experts: cut those out, with the shared parts,
and the sub-model computes exactly what the whole model computes on that domain.

Each group's table columns are drawn from a generator seeded by (seed, the group's
number), so a sub-model that keeps groups [2, 3] of a model redraws exactly the columns
of groups 2 and 3 (`group_ids`) without storing the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

_SEED_STRIDE = 1_000_003  # a prime: (seed, group) pairs give distinct generator seeds


def check_domain_groups(
    domain_groups: Any, num_groups: int, experts_per_group: int, top_k: int, field: str = "rre_domain_groups"
) -> None:
    """Raise ValueError (naming `field`) unless `domain_groups` fits the groups.

    domain_groups: {domain name: [group, ...]}, every domain with the same number n of
    distinct groups in 0..num_groups-1, n dividing top_k, top_k / n <= experts_per_group.
    """
    if not isinstance(domain_groups, Mapping) or not domain_groups:
        raise ValueError(
            f"{field}: expected a non-empty mapping of domain name -> [group, ...], got {domain_groups!r}"
        )
    sizes = {}
    for name, groups in domain_groups.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{field}: domain names must be non-empty strings, got {name!r}")
        if not isinstance(groups, (list, tuple)) or not groups:
            raise ValueError(f"{field}: domain {name!r}: expected a non-empty list of groups, got {groups!r}")
        for g in groups:
            if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < num_groups:
                raise ValueError(
                    f"{field}: domain {name!r}: group {g!r} does not exist; groups are 0..{num_groups - 1} "
                    f"(num_groups={num_groups})"
                )
        if len(set(groups)) != len(groups):
            raise ValueError(f"{field}: domain {name!r}: a group is listed twice in {list(groups)}")
        sizes[name] = len(groups)
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"{field}: every domain needs the same number of groups (top_k is split evenly over "
            f"a domain's groups); got {listed}"
        )
    n = next(iter(sizes.values()))
    if top_k % n:
        raise ValueError(
            f"{field}: top_k={top_k} experts per token cannot be split evenly over {n} groups per domain"
        )
    if top_k // n > experts_per_group:
        raise ValueError(
            f"{field}: top_k={top_k} over {n} group(s) per domain asks {top_k // n} experts of a group "
            f"of {experts_per_group}"
        )


def check_group_ids(group_ids: Any, num_groups: int, field: str = "rre_group_ids") -> None:
    """Raise ValueError unless `group_ids` is None or num_groups distinct ints >= 0."""
    if group_ids is None:
        return
    ok = isinstance(group_ids, (list, tuple)) and all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in group_ids
    )
    if not ok or len(group_ids) != num_groups or len(set(group_ids)) != num_groups:
        raise ValueError(
            f"{field}: expected {num_groups} distinct group numbers >= 0 (one per group), got {group_ids!r}"
        )


def make_domain_routing_table(
    vocab_size: int, experts_per_group: int, per_group: int, seed: int, group_ids: Sequence[int]
) -> Tensor:
    """Level 2: token id -> `per_group` experts inside every group. [V, M * q] int64, CPU.

    Group m (local number; `group_ids[m]` seeds it) gets columns m*q .. m*q+q-1 holding
    q distinct expert ids of that group (m*G .. m*G+G-1), ascending. Ranking i.i.d.
    uniforms gives every (token, group) a uniformly random q-subset.
    """
    G, q = experts_per_group, per_group
    cols = []
    for m, g in enumerate(group_ids):
        gen = torch.Generator(device="cpu").manual_seed(seed * _SEED_STRIDE + g)
        noise_VG = torch.rand(vocab_size, G, generator=gen, device="cpu")
        cols.append(noise_VG.argsort(dim=-1)[:, :q].sort(dim=-1).values + m * G)
    return torch.cat(cols, dim=1)


def domain_columns(domain_groups: Mapping[str, Sequence[int]], per_group: int) -> Tensor:
    """Level 1: [N, K] int64, the table columns of each domain's groups (ascending groups).

    Domain ids follow the mapping's order. The column order (group by group) is the
    order of a token's K experts, so a sub-model keeps it.
    """
    rows = []
    for groups in domain_groups.values():
        rows.append([g * per_group + i for g in sorted(groups) for i in range(per_group)])
    return torch.tensor(rows, dtype=torch.int64)


def domain_routed(
    token_ids: Tensor, domain_ids: Tensor, table_VC: Tensor, columns_NK: Tensor
) -> tuple[Tensor, Tensor]:
    """Two-level RRE: expert ids of every token from its domain's columns of the table.

    token_ids [T], domain_ids [T] (int, in [0, N)), table_VC [V, M*q], columns_NK [N, K]
    -> weights [T, K] float32 (1/K each: no gate is learned, the experts are averaged),
    expert_ids [T, K] int64, group by group.
    """
    N, V = columns_NK.shape[0], table_VC.shape[0]
    if token_ids.shape != domain_ids.shape or token_ids.dim() != 1:
        raise ValueError(
            f"domain_ids: expected shape {tuple(token_ids.shape)} (one per token), got {tuple(domain_ids.shape)}"
        )
    if domain_ids.dtype.is_floating_point or domain_ids.dtype == torch.bool:
        raise ValueError(f"domain_ids: expected integer domain ids, got dtype {domain_ids.dtype}")
    if token_ids.numel():
        lo, hi = int(domain_ids.min()), int(domain_ids.max())
        if lo < 0 or hi >= N:
            bad = lo if lo < 0 else hi
            raise ValueError(f"domain_ids: {bad} is not a domain; this layer has {N} (ids 0..{N - 1})")
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= V:
            raise ValueError(f"token_ids: ids must be in [0, {V}) (rre_vocab_size)")
    cols_TK = columns_NK.to(table_VC.device).index_select(0, domain_ids.long())
    rows_TK = rearrange(token_ids.long(), "t -> t 1").expand_as(cols_TK)
    ids_TK = table_VC[rows_TK, cols_TK]
    K = columns_NK.shape[1]
    weights_TK = torch.full(ids_TK.shape, 1.0 / K, dtype=torch.float32, device=ids_TK.device)
    return weights_TK, ids_TK


def reachable_experts(
    domain_groups: Mapping[str, Sequence[int]], domain: str, experts_per_group: int
) -> list[int]:
    """The expert ids a domain's tokens can reach: every expert of its groups, ascending."""
    return [
        g * experts_per_group + j for g in sorted(domain_groups[domain]) for j in range(experts_per_group)
    ]


# --- what MoGELayer calls -------------------------------------------------------------


def check_sigma_config(cfg: Any) -> None:
    """The two-level fields of a MoGEConfig: rre_domain_groups and rre_group_ids."""
    if cfg.rre_domain_groups is None:  # only rre_group_ids was set: name it, whatever the router
        raise ValueError("rre_group_ids: only meaningful with rre_domain_groups (a domain sub-model)")
    if cfg.router != "random":
        raise ValueError(
            f"rre_domain_groups: the two-level (domain) routing is PanGu-Sigma's Random Routed "
            f"Experts; it needs router: random, got router: {cfg.router}"
        )
    if cfg.capacity_factor is not None:
        raise ValueError(
            "capacity_factor: with rre_domain_groups a domain's tokens reach only its groups' experts, "
            "so capacity sized over all experts drops another set of slots than in its sub-model "
            "(moge extract would no longer be exact); leave it null"
        )
    check_domain_groups(cfg.rre_domain_groups, cfg.num_groups, cfg.num_experts // cfg.num_groups, cfg.top_k)
    check_group_ids(cfg.rre_group_ids, cfg.num_groups)


def layer_tables(cfg: Any) -> tuple[Tensor, Tensor]:
    """(table [V, M*q], columns [N, K]) of a MoGEConfig with rre_domain_groups."""
    n = len(next(iter(cfg.rre_domain_groups.values())))
    q = cfg.top_k // n
    group_ids = cfg.rre_group_ids if cfg.rre_group_ids is not None else range(cfg.num_groups)
    table = make_domain_routing_table(
        cfg.rre_vocab_size, cfg.num_experts // cfg.num_groups, q, cfg.rre_seed, group_ids
    )
    return table, domain_columns(cfg.rre_domain_groups, q)


def two_level_route(
    token_ids: Tensor | None,
    domain_ids: Tensor | None,
    table_VC: Tensor,
    columns_NK: Tensor,
    route_scale: float,
) -> tuple[Tensor, Tensor]:
    """The layer's routing step: token_ids, domain_ids (any equal shapes, flattened) -> (weights, ids).

    With one domain (a sub-model) domain_ids may be None: every token is domain 0.
    """
    if token_ids is None:
        raise ValueError("token_ids: the random router needs the token ids of the input")
    tokens_T = token_ids.reshape(-1)
    N = columns_NK.shape[0]
    if domain_ids is None:
        if N > 1:
            raise ValueError(
                f"domain_ids: the two-level random router (rre_domain_groups) has {N} domains and needs "
                "the domain of every sequence; pass domain_ids, or cut one domain out with "
                "`moge extract RUN --domain D OUT`"
            )
        domain_ids = torch.zeros_like(tokens_T)
    domains_T = domain_ids.reshape(-1) if domain_ids.numel() == tokens_T.numel() else domain_ids
    weights_TK, ids_TK = domain_routed(tokens_T, domains_T, table_VC, columns_NK)
    return (weights_TK * route_scale if route_scale != 1.0 else weights_TK), ids_TK
