"""Expert knock-out: validation loss with experts, groups or the router's choices taken away.

Legend: T tokens, E experts, K experts per token, M groups, G experts per group, L MoE layers.

Interventions on one MoE layer's routing (its experts and the rest of the model untouched):

- remove(experts): the removed experts cannot be chosen while their group has another
  expert left (the router takes the next best, as pruning would); where a router still
  picks one (a whole group removed, or the random router's fixed table) its gate is 0.
  Gates are then formed from the kept scores as the router does (renormalised if
  moe.normalize_weights, times route_scale and the learned expert scale).
- uniform: the router's preferences erased: experts drawn uniformly at random under the
  router's own rule (one per group for MoGE; seeded), every gate the score an all-zero
  router gives (1/E for softmax, 1/2 for sigmoid), then post-processed as above.
- drop_one_per_group: in every group where a token chose experts, the lowest-scored one
  is dropped (gate 0). With MoGE's K' = K/M = 1 that drops every routed expert and leaves
  the shared expert alone.

PanGu-Sigma's two-level router (moe.rre_domain_groups) takes its experts from the
sequence's domain and the token id alone and gives each the gate 1/K (times route_scale
and the learned expert scale): there is no next best to fall back on and no preference
to erase. There remove zeroes the removed experts' gates (as zeroing their weights
would), uniform changes nothing, and drop_one_per_group drops the lowest-gated chosen
expert of every group (the first on ties). The batches carry their domains
(`moge.training.corpus.Batch`), which the model is given.

With a capacity factor (moe.capacity_factor) the intervened routing goes through the
layer's capacity again, as the router's own does (the baseline is measured with it): the
same room per expert or group, the slots of highest router score kept; a slot the
intervention gave gate 0 takes no room.

`knockout_sweep` measures the val loss with each expert removed and each group removed
(one layer at a time), with each layer's routing forced uniform and with one fewer expert
per group, and both of those in every layer at once. Differences are loss - baseline.
The interventions replace a layer's `route_tokens` on the instance for the duration of
a `with knocked_out(...)` block only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from moge.layer import MoGELayer, MoGEOutput
from moge.routing import finalize_weights, select_experts
from moge.training.corpus import Batch

_MASKED = -1e9  # a removed expert's score for selection: below any softmax/sigmoid score plus bias


@dataclass(frozen=True)
class Intervention:
    """kind: remove, uniform or drop_one_per_group; experts: the removed ones (remove)."""

    kind: str
    experts: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("remove", "uniform", "drop_one_per_group"):
            raise ValueError(f"kind: expected remove, uniform or drop_one_per_group, got {self.kind!r}")


def _gates(layer: MoGELayer, raw_TK: Tensor, ids_TK: Tensor) -> Tensor:
    """Selected scores -> gates, as MoGELayer.route_tokens post-processes them."""
    s = layer.settings
    w_TK = finalize_weights(raw_TK, s.normalize_weights, s.route_scale)
    if layer.expert_scale_E is not None:
        w_TK = w_TK * layer.expert_scale_E.float()[ids_TK]
    return w_TK


def _select(layer: MoGELayer, scores_TE: Tensor, tokens_T: Tensor | None, bias: Tensor | None) -> Tensor:
    _, ids_TK = select_experts(
        scores_TE, layer.settings, bias=bias, token_ids=tokens_T, table_VK=layer.rre_table_VK
    )
    return ids_TK


def drop_lowest_per_group(raw_TK: Tensor, ids_TK: Tensor, num_groups: int, num_experts: int) -> Tensor:
    """Keep mask [T, K]: False at the lowest-scored chosen expert of every (token, group) pair."""
    group_TK = ids_TK // (num_experts // num_groups)
    keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    rows_T = torch.arange(ids_TK.shape[0], device=ids_TK.device)
    for g in range(num_groups):
        in_g_TK = group_TK == g
        has_T = in_g_TK.any(1)
        lowest_T = raw_TK.masked_fill(~in_g_TK, float("inf")).argmin(1)
        keep_TK[rows_T[has_T], lowest_T[has_T]] = False
    return keep_TK


def intervene(
    layer: MoGELayer, out: MoGEOutput, tokens_T: Tensor | None, iv: Intervention, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(expert ids [T, K], gates [T, K]) of the layer's routing `out` under the intervention."""
    c = layer.config
    if c.two_level:
        return _intervene_two_level(layer, out, iv)
    scores_TE = out.scores
    if iv.kind == "remove":
        removed_E = torch.zeros(c.num_experts, dtype=torch.bool, device=scores_TE.device)
        removed_E[list(iv.experts)] = True
        ids_TK = _select(layer, scores_TE.masked_fill(removed_E, _MASKED), tokens_T, layer.balance_bias_E)
        raw_TK = scores_TE.gather(1, ids_TK).masked_fill(removed_E[ids_TK], 0.0)
    elif iv.kind == "uniform":
        random_TE = torch.rand(scores_TE.shape, generator=gen, dtype=torch.float32).to(scores_TE.device)
        ids_TK = _select(layer, random_TE, tokens_T, None)
        uniform = 1.0 / c.num_experts if c.score_func == "softmax" else 0.5
        raw_TK = torch.full(ids_TK.shape, uniform, dtype=torch.float32, device=scores_TE.device)
    else:
        ids_TK = out.expert_ids
        raw_TK = scores_TE.gather(1, ids_TK)
        raw_TK = raw_TK * drop_lowest_per_group(raw_TK, ids_TK, c.num_groups, c.num_experts)
    return ids_TK, _gates(layer, raw_TK, ids_TK)


def _intervene_two_level(layer: MoGELayer, out: MoGEOutput, iv: Intervention) -> tuple[Tensor, Tensor]:
    """The two-level router's (ids, gates) under `iv`: its experts are fixed by (domain, token id)."""
    c = layer.config
    ids_TK, gates_TK = out.expert_ids, out.weights
    if iv.kind == "remove":
        removed_E = torch.zeros(c.num_experts, dtype=torch.bool, device=ids_TK.device)
        removed_E[list(iv.experts)] = True
        return ids_TK, gates_TK.masked_fill(removed_E[ids_TK], 0.0)
    if iv.kind == "drop_one_per_group":
        return ids_TK, gates_TK * drop_lowest_per_group(gates_TK, ids_TK, c.num_groups, c.num_experts)
    return ids_TK, gates_TK  # uniform: every gate is already 1/K, the experts those of the fixed table


def within_capacity(layer: MoGELayer, out: MoGEOutput, mask_T: Tensor | None) -> tuple[Tensor, Tensor]:
    """(gates [T, K], dropped [E]) of an intervened routing `out` under the layer's capacity:
    the layer's own rule, with the slots the intervention gave gate 0 taking no room."""
    return layer.drop_over_capacity(out.scores, out.weights, out.expert_ids, mask_T, free_TK=out.weights == 0)


@contextmanager
def knocked_out(model, plan: dict[int, Intervention]) -> Iterator[None]:
    """Apply {MoE layer position (0 = first MoE layer): intervention} inside the block."""
    layers = list(model.moe_layers())
    patched = []
    try:
        for pos, iv in plan.items():
            layer = layers[pos]
            gen = torch.Generator().manual_seed(iv.seed)

            def route_tokens(
                x_TD, token_ids, lead, domain_ids=None, mask_T=None, *, _layer=layer, _iv=iv, _gen=gen
            ):
                out = MoGELayer.route_tokens(_layer, x_TD, token_ids, lead, domain_ids, mask_T)
                tokens_T = token_ids.reshape(-1) if token_ids is not None else None
                out.expert_ids, out.weights = intervene(_layer, out, tokens_T, _iv, _gen)
                if _layer.config.capacity_factor is not None:
                    out.weights, out.dropped = within_capacity(_layer, out, mask_T)
                return out

            layer.route_tokens = route_tokens  # the instance attribute shadows the method
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.route_tokens


@torch.no_grad()
def mean_loss(model, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Token-weighted mean LM loss (nats) of `model` over (x_BL, y_BL) batches (a Batch gives its domains)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        x_BL, y_BL = batch
        kwargs = batch.model_kwargs(device) if isinstance(batch, Batch) else {}
        out = model(x_BL.to(device), y_BL.to(device), **kwargs)
        total += float(out.lm_loss) * y_BL.numel()
        count += y_BL.numel()
    return total / count


def knockout_sweep(
    model, batches: Sequence[tuple[Tensor, Tensor]], layer_ids: Sequence[int], seed: int = 0
) -> dict:
    """Loss increases under every intervention (see the module doc); model in eval mode.

    layer_ids: the block index of each MoE layer (for the report). Returns plain data:
    baseline, experts [L][E], groups [L][M], uniform [L], drop_one_per_group [L],
    all_layers {uniform, drop_one_per_group}.
    """
    layers = list(model.moe_layers())
    if not layers:
        raise ValueError("knock-out: the model has no MoE layer")
    base = mean_loss(model, batches)

    def delta(plan: dict[int, Intervention]) -> float:
        with knocked_out(model, plan):
            return mean_loss(model, batches) - base

    experts, groups, uniform, drop = [], [], [], []
    for pos, layer in enumerate(layers):
        E, M = layer.config.num_experts, layer.config.num_groups
        G = E // M
        experts.append([delta({pos: Intervention("remove", (e,))}) for e in range(E)])
        groups.append(
            [delta({pos: Intervention("remove", tuple(range(g * G, (g + 1) * G)))}) for g in range(M)]
        )
        uniform.append(delta({pos: Intervention("uniform", seed=seed)}))
        drop.append(delta({pos: Intervention("drop_one_per_group")}))
    every = range(len(layers))
    return {
        "baseline": base,
        "layers": list(layer_ids),
        "tokens": sum(y.numel() for _, y in batches),
        "experts": experts,
        "groups": groups,
        "uniform": uniform,
        "drop_one_per_group": drop,
        "all_layers": {
            "uniform": delta({p: Intervention("uniform", seed=seed + p) for p in every}),
            "drop_one_per_group": delta({p: Intervention("drop_one_per_group") for p in every}),
        },
    }


def format_knockout(k: dict) -> str:
    """The knock-out table: per layer the worst expert and group, uniform routing, one fewer."""
    lines = [
        f"knock-out on {k['tokens']:,} val tokens (baseline loss {k['baseline']:.4f}): loss increase",
        f"{'layer':>5} {'worst expert':>15} {'mean expert':>11} {'worst group':>14} {'uniform':>9} {'-1/group':>9}",
    ]
    for i, layer in enumerate(k["layers"]):
        ex, gr = k["experts"][i], k["groups"][i]
        e = max(range(len(ex)), key=ex.__getitem__)
        g = max(range(len(gr)), key=gr.__getitem__)
        lines.append(
            f"{layer:>5} {f'e{e} {ex[e]:+.4f}':>15} {sum(ex) / len(ex):>+11.4f} {f'g{g} {gr[g]:+.4f}':>14} "
            f"{k['uniform'][i]:>+9.4f} {k['drop_one_per_group'][i]:>+9.4f}"
        )
    a = k["all_layers"]
    lines.append(
        f"{'all':>5} {'':>15} {'':>11} {'':>14} {a['uniform']:>+9.4f} {a['drop_one_per_group']:>+9.4f}"
    )
    return "\n".join(lines)


def plot_knockout(k: dict, path) -> None:
    """Heatmaps of the loss increase per (layer, expert) and (layer, group), and the routing bars."""
    import numpy as np
    from matplotlib.figure import Figure

    experts, groups = np.array(k["experts"]), np.array(k["groups"])
    L = len(k["layers"])
    fig = Figure(figsize=(13, 1.2 + 0.45 * L + 1.5), layout="constrained")
    ax_e, ax_g, ax_b = fig.subplots(1, 3, width_ratios=[max(experts.shape[1], 4), max(groups.shape[1], 3), 4])
    for ax, data, what in ((ax_e, experts, "expert"), (ax_g, groups, "group")):
        im = ax.imshow(data, aspect="auto", cmap="magma")
        ax.set_xlabel(what)
        ax.set_ylabel("layer")
        ax.set_yticks(range(L), [str(x) for x in k["layers"]])
        ax.set_title(f"loss increase, one {what} removed", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    y = np.arange(L)
    ax_b.barh(y - 0.2, k["uniform"], height=0.4, label="uniform routing")
    ax_b.barh(y + 0.2, k["drop_one_per_group"], height=0.4, label="one fewer / group")
    ax_b.set_yticks(y, [str(x) for x in k["layers"]])
    ax_b.invert_yaxis()
    ax_b.set_xlabel("loss increase (nats)")
    ax_b.legend(fontsize=7)
    fig.savefig(path, dpi=110)
