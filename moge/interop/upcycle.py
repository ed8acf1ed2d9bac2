"""Sparse upcycling: a dense model's SwiGLU FFNs become MoGE layers, exact at step 0.

Legend: D d_model, F dense hidden, Fs shared hidden, Fe expert hidden, E routed experts,
M groups, G experts per group (E / M), K experts per token, K' = K / M, P slices.

A SwiGLU is a sum over its hidden units, down(silu(gate(x)) * up(x)) =
sum_j down[:, j] silu(gate_j . x) up_j . x, so any partition of the F hidden units into
pieces gives FFNs whose outputs add up to the dense one. Upcycling cuts the dense FFN:

- the shared expert takes the first Fs units (Fs = moe.shared_width, 0 without one;
  with Qwen2-MoE's shared-expert gate, the gate starts at 0, so sigmoid gives exactly
  1/2, and the shared down projection is doubled);
- the other R = F - Fs units are cut into P = R / Fe slices of Fe units each
  (P = 1: every routed expert is a copy of the remaining FFN, "copy upcycling";
  P > 1: fine-grained upcycling, as Qwen1.5-MoE did);
- slice p fills the M / P contiguous groups p * M/P .. (p+1) * M/P - 1: every expert of
  a group is a copy of the same slice.

The rule that makes it exact. The grouped router takes exactly K' experts from every
group, so whatever it picks, a token receives slice p K' times from each of its M/P
groups: K/P copies of every slice, none missing, none extra. Each copy is weighted by
its gate times a constant `expert_scale` a (the learned per-expert scale when
moe.learned_expert_scale is on, else folded into the experts' down projections), and
the total weight of every slice must be 1 for every token:

- raw gates (the paper: softmax scores of the chosen experts, not renormalised). They
  depend on the token unless all router logits are equal, so the router starts at 0
  ("uniform"): every score is u = 1/E (softmax) or 1/2 (sigmoid), every gate
  u * route_scale, and a = P / (K u route_scale) makes the K/P copies of a slice sum to 1.
- renormalised gates (moe.normalize_weights). The K gates sum to route_scale; a slice's
  share must be the same for every token. With P = 1 every expert is the same FFN, so
  any router will do ("random"). With P > 1 the router rows of the G experts of a group
  are drawn at random once and repeated in every group ("replicated"): every group's
  chosen scores are then the same numbers, so each group's share is exactly 1/M, and
  a = P / route_scale. A fully random router would give a slice a token-dependent share.

Routers that give no per-group quota (global, group_limited) may take all of a token's
experts from one group, so they only upcycle exactly with P = 1; the random (RRE) router
keeps the quota but picks by token id, so with renormalised gates and P > 1 only the
uniform init is exact. PanGu-Sigma's two-level router (moe.rre_domain_groups) ignores the
router: every gate is route_scale / K, so a = P / route_scale with any init, raw gates or
not; a token reaches only its domain's groups, so slices need every domain's groups to
hold each slice equally often. A capacity factor must leave room for every slot a bucket can
receive when the copies tie (an expert: T, cf >= E/K; a group under a quota router: its
quota, cf >= 1). `plan_upcycle` raises ValueError naming the field and the reason
for every split that cannot be exact.

Symmetry: copies of one slice are identical at step 0. With renormalised gates the
random/replicated router splits a group's tokens between them from the first step; with
the uniform router the ties go to the lowest index, so the first K' experts of each group
take every token at step 0 and the router's first gradients (which differ between chosen
and unchosen experts, and the balance loss) break the tie during training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

from moge.experts import SwiGLU
from moge.layer import MoGEConfig, MoGELayer
from moge.model import MoGETransformer
from moge.model.config import ModelConfig
from moge.routing import QUOTA_ROUTERS

ROUTER_INITS = ("auto", "uniform", "replicated", "random")
# ModelConfig fields the upcycled decoder may change: which blocks are MoE, and what no
# weight and no logit depends on. Every other field is the dense model's.
ADJUSTABLE = ("first_dense_layers", "moe_every", "max_seq_len", "init_std")


@dataclass(frozen=True)
class UpcyclePlan:
    """How one dense SwiGLU of width F becomes one MoGE layer (see the module docstring)."""

    dense_hidden: int  # F: hidden units of the dense FFN
    shared_hidden: int  # Fs: the first Fs units become the shared expert (0: none)
    expert_hidden: int  # Fe: units of every routed expert (one slice)
    num_slices: int  # P = (F - Fs) / Fe; 1: every routed expert is a copy
    groups_per_slice: int  # M / P: consecutive groups holding copies of the same slice
    experts_per_group: int  # G
    router_init: str  # uniform (zeros), replicated or random (normal, std model.init_std)
    expert_scale: float  # a: the constant every routed expert's output is multiplied by
    scale_in_expert_scale: bool  # True: a goes into expert_scale_E; False: into w_down_EFD

    def slice_of_expert(self, e: int) -> int:
        return e // self.experts_per_group // self.groups_per_slice

    def units_of_slice(self, p: int) -> slice:
        """The dense hidden units slice p holds."""
        start = self.shared_hidden + p * self.expert_hidden
        return slice(start, start + self.expert_hidden)

    def describe(self) -> str:
        if self.num_slices == 1:
            kind = "copies of the dense FFN"
        else:
            kind = f"{self.num_slices} slices, each in {self.groups_per_slice} group(s),"
        where = "moe learned expert scale" if self.scale_in_expert_scale else "expert down projections"
        shared = f"shared expert: units 0..{self.shared_hidden - 1}; " if self.shared_hidden else ""
        return (
            f"dense hidden {self.dense_hidden} -> {shared}routed experts: {kind} of width "
            f"{self.expert_hidden}; router init "
            f"{self.router_init}; expert scale {self.expert_scale:g} (in the {where})"
        )


# --- the plan: which split is exact -------------------------------------------------


def _uniform_score(moe: MoGEConfig) -> float:
    """The score every expert gets from an all-zero router."""
    return 1.0 / moe.num_experts if moe.score_func == "softmax" else 0.5


def _check_split(dense_hidden: int, moe: MoGEConfig) -> int:
    """The number of slices P, or ValueError naming the field that prevents an exact split."""
    F, Fs, Fe = dense_hidden, moe.shared_width, moe.expert_hidden
    if Fs >= F:
        raise ValueError(
            f"shared_hidden: the shared expert would take {Fs} of the dense FFN's {F} hidden units, "
            "leaving none for the routed experts (the shared expert takes the first units)"
        )
    R = F - Fs
    if R % Fe:
        raise ValueError(
            f"expert_hidden: the {R} hidden units left for the routed experts (dense {F} - shared {Fs}) "
            f"do not split into slices of {Fe}; use a divisor of {R} ({R}: copies)"
        )
    P = R // Fe
    if P == 1:
        return P
    if moe.router not in QUOTA_ROUTERS:
        raise ValueError(
            f"router: fine-grained upcycling ({P} slices of {Fe}) needs a router that takes a fixed "
            f"number of experts from every group ({', '.join(QUOTA_ROUTERS)}); {moe.router} may take "
            f"all of a token's experts from one group, so a token could miss a slice; set "
            f"expert_hidden={R} to copy the FFN instead"
        )
    if moe.num_groups % P:
        raise ValueError(
            f"num_groups: {P} slices of {Fe} units must each fill whole groups (every expert of a "
            f"group is a copy of one slice, so a token gets that slice whatever the router picks), "
            f"but {P} does not divide num_groups={moe.num_groups}"
        )
    _check_domains(moe, P)
    return P


def _check_domains(moe: MoGEConfig, P: int) -> None:
    """ValueError unless every domain's groups hold each of the P slices equally often (a
    domain's tokens take K / n experts from each of its n groups and reach no other)."""
    if not moe.two_level:
        return
    assert moe.rre_domain_groups is not None
    per_slice = moe.num_groups // P
    for name, groups in moe.rre_domain_groups.items():
        held = sorted(g // per_slice for g in groups)
        if held != sorted(list(range(P)) * (len(groups) // P)):
            raise ValueError(
                f"rre_domain_groups: domain {name!r} takes its experts from groups {sorted(groups)}, which "
                f"hold slices {held} of the {P}; its tokens would not get every slice equally often, so "
                f"the upcycled model would not equal the dense one; give every domain the same number of "
                f"groups of each slice, or set expert_hidden={P * moe.expert_hidden} to copy the FFN"
            )


def _resolve_router_init(router_init: str, moe: MoGEConfig, P: int) -> str:
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init: expected one of {', '.join(ROUTER_INITS)}; got {router_init!r}")
    if router_init == "auto":
        if not moe.normalize_weights or moe.two_level:
            return "uniform"
        if P == 1:
            return "random"
        return "replicated" if moe.router == "grouped" else "uniform"
    if router_init == "uniform" or moe.two_level:  # the two-level router never reads the router
        return router_init
    if not moe.normalize_weights:
        raise ValueError(
            f"router_init: {router_init} gives token-dependent scores, and with raw gates "
            "(moe.normalize_weights false) the chosen experts' gates then sum to a token-dependent "
            "total, so the upcycled model would not equal the dense one; use uniform"
        )
    if router_init == "random" and P > 1:
        raise ValueError(
            f"router_init: random gives each of the {P} slices a token-dependent share of the "
            "renormalised gates; use replicated (the same router rows in every group) or uniform"
        )
    if router_init == "replicated" and P > 1 and moe.router != "grouped":
        raise ValueError(
            f"router_init: replicated makes the chosen scores of every group equal only under the "
            f"grouped router ({moe.router} picks other experts in each group); use uniform"
        )
    return router_init


def _check_capacity(moe: MoGEConfig) -> None:
    """ValueError unless the capacity can never drop a slot.

    At step 0 the copies of a slice tie, so the uniform router sends every token to the
    same first experts of each group, and any router may: a bucket must hold the most
    slots it can receive. A token's slots land in an expert at most once (T per expert
    in all), in a group K' times under a quota router and up to min(K, G) times under
    the others, while a bucket holds cf * T * K / buckets.
    """
    cf = moe.capacity_factor
    if cf is None:
        return
    K, G = moe.top_k, moe.experts_per_group
    if moe.capacity_scope == "group":
        buckets, most = moe.num_groups, (K // moe.num_groups if moe.router in QUOTA_ROUTERS else min(K, G))
    else:
        buckets, most = moe.num_experts, 1
    need = most * buckets / K  # the smallest factor whose bucket holds `most` slots per token
    if round(cf, 9) < round(need, 9):
        raise ValueError(
            f"capacity_factor: {cf:g} gives each {moe.capacity_scope} room for {cf * K / buckets:g} slots "
            f"per token, but at step 0 the upcycled copies tie and one {moe.capacity_scope} can receive "
            f"{most} per token, so slots would be dropped and the model would not equal the dense one; "
            f"upcycle dropless (capacity_factor null; set it for training afterwards) or use >= {need:g}"
        )


def plan_upcycle(dense_hidden: int, moe: MoGEConfig, router_init: str = "auto") -> UpcyclePlan:
    """Check that a dense SwiGLU of width `dense_hidden` upcycles exactly into `moe`.

    router_init: "auto" (uniform for raw gates, random for renormalised copies,
    replicated for renormalised slices under the grouped router), or one of uniform,
    replicated, random. Raises ValueError (field: reason) when no exact split exists.
    """
    if isinstance(dense_hidden, bool) or not isinstance(dense_hidden, int) or dense_hidden < 1:
        raise ValueError(f"dense_hidden: expected an integer >= 1, got {dense_hidden!r}")
    P = _check_split(dense_hidden, moe)
    init = _resolve_router_init(router_init, moe, P)
    _check_capacity(moe)
    if moe.normalize_weights or moe.two_level:  # the K gates sum to route_scale
        scale = P / moe.route_scale
    else:
        scale = P / (moe.top_k * _uniform_score(moe) * moe.route_scale)
    return UpcyclePlan(
        dense_hidden=dense_hidden, shared_hidden=moe.shared_width, expert_hidden=moe.expert_hidden,
        num_slices=P, groups_per_slice=moe.num_groups // P, experts_per_group=moe.experts_per_group,
        router_init=init, expert_scale=scale, scale_in_expert_scale=moe.learned_expert_scale,
    )  # fmt: skip


# --- one layer ----------------------------------------------------------------------


def _router_weight(plan: UpcyclePlan, moe: MoGEConfig, std: float, gen: torch.Generator) -> Tensor:
    """[E, D] float32 router weight for the plan's init."""
    E, D, G = moe.num_experts, moe.d_model, plan.experts_per_group
    if plan.router_init == "uniform":
        return torch.zeros(E, D)
    if plan.router_init == "random":
        return torch.randn(E, D, generator=gen) * std
    rows_GD = torch.randn(G, D, generator=gen) * std
    return repeat(rows_GD, "g d -> (m g) d", m=moe.num_groups)


@torch.no_grad()
def upcycle_ffn(
    dense: SwiGLU, layer: MoGELayer, plan: UpcyclePlan, *, router_std: float, generator: torch.Generator
) -> None:
    """Overwrite `layer`'s router, experts, shared expert and expert scale from `dense`."""
    moe = layer.config
    F = plan.dense_hidden
    if dense.hidden != F:
        raise ValueError(f"dense_hidden: the dense FFN has {dense.hidden} hidden units, the plan {F}")
    w_gate_FD, w_up_FD = dense.w_gate_up.weight.float().split(F, dim=0)
    w_down_DF = dense.w_down.weight.float()
    scale = plan.expert_scale
    down_scale = 1.0 if plan.scale_in_expert_scale else scale
    for e in range(moe.num_experts):
        units = plan.units_of_slice(plan.slice_of_expert(e))
        gate_up_DH = rearrange(torch.cat((w_gate_FD[units], w_up_FD[units])), "h d -> d h")
        layer.experts.w_gate_up_EDH[e].copy_(gate_up_DH)
        layer.experts.w_down_EFD[e].copy_(rearrange(w_down_DF[:, units], "d f -> f d") * down_scale)
    if layer.shared is not None:
        Fs = plan.shared_hidden
        shared_gate = getattr(layer, "shared_gate", None)  # Qwen2-MoE's sigmoid gate, when present
        # A zero gate weight gives sigmoid(0) = 1/2 exactly for every token; doubling the
        # shared down projection makes up for it (both factors are exact in floating point).
        shared_scale = 1.0 if shared_gate is None else 2.0
        layer.shared.w_gate_up.weight.copy_(torch.cat((w_gate_FD[:Fs], w_up_FD[:Fs])))
        layer.shared.w_down.weight.copy_(w_down_DF[:, :Fs] * shared_scale)
        if shared_gate is not None:
            shared_gate.weight.zero_()
    if layer.expert_scale_E is not None:
        layer.expert_scale_E.fill_(scale)
    layer.router.weight.copy_(_router_weight(plan, moe, router_std, generator))
    if layer.balance_bias_E is not None:
        layer.balance_bias_E.zero_()


# --- a whole model ------------------------------------------------------------------


# Everything upcycle_ffn writes; a MoE layer holding anything else cannot be upcycled exactly.
_KNOWN_FFN_KEYS = (
    "router.weight", "experts.w_gate_up_EDH", "experts.w_down_EFD", "shared.w_gate_up.weight",
    "shared.w_down.weight", "shared_gate.weight", "expert_scale_E", "balance_bias_E",
)  # fmt: skip


def _check_known(name: str) -> None:
    leaf = name.split(".ffn.", 1)[1]
    if leaf not in _KNOWN_FFN_KEYS:
        raise ValueError(f"{name}: upcycling does not know how to initialise this MoE weight exactly")


def _ffn_prefixes(model: MoGETransformer) -> list[str]:
    return [f"blocks.{b.index}.ffn." for b in model.blocks if isinstance(b.ffn, MoGELayer)]


def _check_model_config(dense_cfg: ModelConfig, model_cfg: ModelConfig) -> None:
    """ValueError naming the first field outside ADJUSTABLE that model_cfg changes (the same
    weight shapes may still give another function: rope_theta, norm_eps, n_heads, ...)."""
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        if name in ADJUSTABLE:
            continue
        ours, theirs = getattr(model_cfg, name), getattr(dense_cfg, name)
        if name == "dense_hidden":  # None means 4 * d_model: compare the widths
            ours, theirs = model_cfg.resolved_dense_hidden, dense_cfg.resolved_dense_hidden
        if ours != theirs:
            raise ValueError(
                f"model.{name}: {ours!r} differs from the dense model's {theirs!r}; the upcycled "
                f"decoder is the dense one, so only {', '.join(ADJUSTABLE)} may differ"
            )


def upcycled_model_config(dense: MoGETransformer) -> ModelConfig:
    """The dense model's ModelConfig with every block MoE (the default of upcycle_model)."""
    return dataclasses.replace(dense.cfg, first_dense_layers=0, moe_every=1)


@torch.no_grad()
def upcycle_model(
    dense: MoGETransformer,
    moe: MoGEConfig,
    model_cfg: ModelConfig | None = None,
    *,
    router_init: str = "auto",
    seed: int = 0,
) -> tuple[MoGETransformer, UpcyclePlan]:
    """A MoGETransformer whose MoE layers are upcycled from `dense` (all FFNs dense).

    model_cfg: the upcycled decoder (default: dense's with every block MoE); it may
    differ from dense's only in which blocks are MoE (first_dense_layers, moe_every) and
    in what shapes no weight (max_seq_len, init_std). Embeddings, attention, norms, LM
    head and the FFNs of blocks that stay dense are copied. At step 0 the result gives
    the dense model's logits (fp32: up to rounding). `seed` seeds the random router rows.
    Returns the model (float32, on the CPU, in dense's train/eval mode) and the plan.
    """
    moe_blocks = [b.index for b in dense.blocks if isinstance(b.ffn, MoGELayer)]
    if moe_blocks:
        raise ValueError(
            f"model.first_dense_layers: the source model has MoE layers (blocks {moe_blocks}); "
            "upcycling starts from a model whose FFNs are all dense"
        )
    plan = plan_upcycle(dense.cfg.resolved_dense_hidden, moe, router_init)
    model_cfg = model_cfg or upcycled_model_config(dense)
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the caller's RNG be
        target = MoGETransformer(model_cfg, moe)
    source = {k: v.detach().cpu() for k, v in dense.state_dict().items()}
    prefixes = tuple(_ffn_prefixes(target))
    for name, t in target.state_dict().items():
        if name.startswith(prefixes):
            _check_known(name)
            continue
        if name not in source or source[name].shape != t.shape:
            found = tuple(source[name].shape) if name in source else "missing"
            raise ValueError(
                f"{name}: the dense model has {found}, the upcycled model needs {tuple(t.shape)}"
            )
        t.copy_(source[name])
    _check_model_config(dense.cfg, model_cfg)  # after the shapes, which name the tensor
    gen = torch.Generator().manual_seed(seed)
    for src_block, block in zip(dense.blocks, target.blocks):
        if isinstance(block.ffn, MoGELayer):
            assert isinstance(src_block.ffn, SwiGLU), "checked above: the source is all dense"
            upcycle_ffn(src_block.ffn, block.ffn, plan, router_std=model_cfg.init_std, generator=gen)
    return target.train(dense.training), plan
