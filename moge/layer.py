"""The MoGE layer: router + grouped experts + shared experts + balance losses.

Legend: T tokens, D d_model, E routed experts, M groups, K experts per token,
F expert hidden, B batch, L sequence length.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from moge import balance, capacity
from moge._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
)
from moge.experts import GroupedExperts, NormalLinear, SwiGLU
from moge.kernels.precision import compute_dtype, float32_linear
from moge.routing import ROUTER_NAMES, RouterSettings, compute_scores, make_random_routing_table, route
from moge.sigma.routing import check_sigma_config, layer_tables, two_level_route

ROUTERS = ROUTER_NAMES
SCORE_FUNCS = ("softmax", "sigmoid")
AUX_LOSS_TYPES = ("batch", "sequence", "global_batch", "released")
GROUP_SCORES = ("top2_sum", "max")
EXPERT_IMPLS = ("auto", "fused", "grouped_mm", "loop")
ROUTER_DTYPES = ("float32", "input")
CAPACITY_SCOPES = ("expert", "group")


@dataclass
class MoGEConfig:
    """Settings of one MoGE layer. Defaults follow Pangu Pro MoE where it says.

    router: "grouped" (MoGE, K/M experts from every group), "global" (plain top-k),
        "group_limited" (DeepSeek-V3: best `topk_groups` groups, then top-k inside),
        "random" (PanGu-Sigma RRE: fixed random token-id -> experts map per group).
    aux_loss_type: "batch" (the paper's Eq. 8 over all tokens of the call),
        "sequence" (Eq. 8 per sequence, averaged), "global_batch" (f_i over the whole
        step until `MoGELayer.end_step()`: every micro-batch and rank; after a
        `moge.counting_pass` the step's loss and gradients are one call's on the whole
        batch, see balance.global_batch_balance_loss), "released"
        (the released code's objective: Mixtral's loss, global top-k counts, scale E,
        one loss over all layers' rows; see balance.released_balance_loss and
        total_aux_loss).
    aux_loss_coef vs the released `router_aux_loss_coef` c: on one layer's rows with the
        same counts the released loss is K times Eq. 8, so c matches alpha = K * c; pooled
        over L similar layers each layer's router gets about 1/L of that gradient, so c
        matches a per-layer alpha of about K * c / L. The counts also differ (global
        top-k there, the grouped dispatch here). aux_loss_type="released" reproduces it.
    bias_update_rate: > 0 turns on DeepSeek-V3's aux-loss-free balancing bias.
    expert_impl: how routed experts are computed; "auto" picks the fastest correct one
        for the device.
    """

    d_model: int  # input/output width (in a run config: taken from model.d_model)
    num_experts: int  # routed experts E, split into num_groups contiguous groups
    num_groups: int  # groups M, one per device; must divide num_experts
    top_k: int  # experts per token K; grouped/random routers take K/M from every group
    expert_hidden: int  # hidden width F of each routed SwiGLU expert
    num_shared_experts: int = 0  # shared experts, merged into one SwiGLU added unweighted
    shared_hidden: int | None = None  # merged shared width; None: num_shared_experts * expert_hidden
    shared_expert_gate: bool = False  # shared experts times sigmoid(learned [1, D] gate . x) (Qwen2-MoE)
    router: str = "grouped"  # grouped (MoGE), global, group_limited (DeepSeek-V3), random (PanGu-Sigma)
    score_func: str = "softmax"  # softmax over all experts (the paper) or sigmoid
    normalize_weights: bool = False  # renormalise the K selected gates to sum to 1 (the paper: no)
    route_scale: float = 1.0  # constant multiplier of every gate (DeepSeek-V3: 2.5)
    learned_expert_scale: bool = False  # learned per-expert gate scale, init 1 (released Pangu code)
    aux_loss_coef: float = 0.001  # balance-loss weight (batch: Eq. 8 alpha; released: the release c); 0: off
    aux_loss_type: str = "batch"  # batch (Eq. 8 per call), sequence, global_batch or released
    z_loss_coef: float = 0.0  # weight of the ST-MoE router z-loss; 0: off
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3) sign-rule rate; 0: off
    topk_groups: int | None = None  # group_limited: groups kept per token
    group_score: str = "top2_sum"  # group_limited: rank groups by top2_sum or max of their scores
    rre_vocab_size: int | None = None  # random: size of the token-id table (run config: model.vocab_size)
    rre_seed: int = 0  # random: seed of the fixed token-id -> experts table
    rre_domain_groups: dict[str, list[int]] | None = None  # random: PanGu-Sigma domain -> its groups
    rre_group_ids: list[int] | None = None  # sub-model: its groups' numbers in the full model
    expert_impl: str = "auto"  # expert kernel: auto, fused, grouped_mm or loop
    init_std: float = 0.02  # std of the layer's own init (a model re-initialises with model.init_std)
    router_dtype: str = "float32"  # router logits in float32, or "input": the input's dtype (released code)
    capacity_factor: float | None = None  # null: dropless; else ceil(cf*slots/buckets) per bucket, lowest out
    capacity_scope: str = "expert"  # capacity bucket: "expert", or "group" (one group per device)
    dispatch_padding: bool = False  # with a token mask: also run padded tokens through the routed experts

    def __post_init__(self) -> None:
        self._check_types()
        self._check_relations()

    def _check_types(self) -> None:
        for name in ("d_model", "num_experts", "num_groups", "top_k", "expert_hidden"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("num_shared_experts", self.num_shared_experts, minimum=0)
        check_optional_int("shared_hidden", self.shared_hidden, minimum=1)
        check_bool("shared_expert_gate", self.shared_expert_gate)
        check_choice("router", self.router, ROUTERS)
        check_choice("score_func", self.score_func, SCORE_FUNCS)
        check_bool("normalize_weights", self.normalize_weights)
        check_float("route_scale", self.route_scale, minimum=0.0, strict_min=True)
        check_bool("learned_expert_scale", self.learned_expert_scale)
        check_float("aux_loss_coef", self.aux_loss_coef, minimum=0.0)
        check_choice("aux_loss_type", self.aux_loss_type, AUX_LOSS_TYPES)
        check_float("z_loss_coef", self.z_loss_coef, minimum=0.0)
        check_float("bias_update_rate", self.bias_update_rate, minimum=0.0)
        check_optional_int("topk_groups", self.topk_groups, minimum=1)
        check_choice("group_score", self.group_score, GROUP_SCORES)
        check_optional_int("rre_vocab_size", self.rre_vocab_size, minimum=1)
        check_int("rre_seed", self.rre_seed, minimum=0)
        check_choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
        if self.rre_domain_groups is not None or self.rre_group_ids is not None:
            check_sigma_config(self)  # PanGu-Sigma two-level RRE (moge.sigma.routing)
        check_float("init_std", self.init_std, minimum=0.0, strict_min=True)
        check_choice("router_dtype", self.router_dtype, ROUTER_DTYPES)
        if self.capacity_factor is not None:
            check_float("capacity_factor", self.capacity_factor, minimum=0.0, strict_min=True)
        check_choice("capacity_scope", self.capacity_scope, CAPACITY_SCOPES)
        check_bool("dispatch_padding", self.dispatch_padding)

    def _check_relations(self) -> None:
        E, M, K = self.num_experts, self.num_groups, self.top_k
        if E % M:
            raise ValueError(f"num_groups: {M} groups do not divide num_experts={E}")
        if K > E:
            raise ValueError(f"top_k: {K} is larger than num_experts={E}")
        if self.per_group_quota and K % M:
            raise ValueError(
                f"top_k: the {self.router} router takes top_k/num_groups experts from "
                f"every group, so top_k={K} must be a multiple of num_groups={M}"
            )
        if self.router == "group_limited":
            if self.topk_groups is None:
                raise ValueError("topk_groups: the group_limited router needs topk_groups")
            if self.topk_groups > M:
                raise ValueError(f"topk_groups: {self.topk_groups} > num_groups={M}")
            if self.topk_groups * (E // M) < K:
                raise ValueError(
                    f"topk_groups: {self.topk_groups} groups of {E // M} experts hold "
                    f"fewer than top_k={K} experts"
                )
            if self.group_score == "top2_sum" and E // M < 2:
                raise ValueError("group_score: top2_sum needs at least 2 experts per group")
        if self.shared_hidden is not None and self.num_shared_experts == 0:
            raise ValueError(
                f"shared_hidden: {self.shared_hidden} sizes the shared experts, but num_shared_experts is 0"
            )
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate: gates the shared experts, but num_shared_experts is 0")
        if self.router == "random" and self.rre_vocab_size is None:
            raise ValueError(
                "rre_vocab_size: the random router maps token ids, so it needs the vocabulary size"
            )

    @property
    def two_level(self) -> bool:
        """PanGu-Sigma's two-level random router (rre_domain_groups): experts from the domain
        and the token id, gates route_scale / K; a domain's tokens reach only its groups."""
        return self.router == "random" and self.rre_domain_groups is not None

    @property
    def per_group_quota(self) -> bool:
        """Every token takes top_k / num_groups experts from every group (grouped, one-level
        random): each group gets exactly T * top_k / num_groups slots."""
        return self.router == "grouped" or (self.router == "random" and not self.two_level)

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def shared_width(self) -> int:
        """Hidden width of the merged shared SwiGLU (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_hidden or self.num_shared_experts * self.expert_hidden


@dataclass
class MoGEOutput:
    """What one MoGE layer call returns; losses are 0-dim float32 tensors."""

    hidden: Tensor  # x's shape: routed experts + shared experts
    aux_loss: Tensor  # aux_loss_coef * lb_loss + z_loss_coef * z_loss (what to add to the loss)
    expert_ids: Tensor  # [T, K] int64, the selection dispatch used
    weights: Tensor  # [T, K] float32 gates (after renormalisation, scales); float64 in a float64 layer
    load: Tensor  # [E] int64 token-slots per expert in this call
    scores: Tensor  # [T, E] float32 router scores (softmax or sigmoid), before any bias; float64 in a float64 layer
    lb_loss: Tensor  # balance loss of the configured aux_loss_type, unweighted
    z_loss: Tensor  # router z-loss, unweighted
    token_mask: Tensor | None = None  # [T] bool, False: a padded token (counted nowhere); None: all real
    dropped: Tensor | None = None  # [E] int64 slots dropped by the capacity per expert; None: dropless

    @property
    def dropped_fraction(self) -> float:
        """Share of the real tokens' slots dropped by the capacity (0.0 when dropless)."""
        if self.dropped is None:
            return 0.0
        return int(self.dropped.sum()) / max(int(self.load.sum()), 1)


class EndStepWarning(UserWarning):
    """A MoGE layer ran many training calls without `end_step()` (see MoGELayer)."""


class CountingPassWarning(UserWarning):
    """The training pass routed other tokens than the step's counting pass counted."""


class Router(NormalLinear):
    """The router's projection, weight [E, D] ~ N(0, init_std): x_TD [T, D] -> logits [T, E]
    in float32 (dtype None, whatever the input or autocast dtype) or in `dtype` (autocast off).

    Called as a module, not read as `.weight` by its layer, so that a wrapper which
    gathers parameters around a module's forward (FSDP2, parallel.mixed_precision's
    float32 router unit) sees the call."""

    def __init__(self, d_model: int, num_experts: int, init_std: float = 0.02) -> None:
        super().__init__(d_model, num_experts, bias=False, init_std=init_std)

    def forward(self, x_TD: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        if dtype is None:
            return float32_linear(x_TD, self.weight)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return x_TD.to(dtype) @ self.weight.to(dtype).T


class MoGELayer(nn.Module):
    """Router + E routed SwiGLU experts + an optional merged shared SwiGLU.

    `layer(x, token_ids=None)` with x [..., D] returns a MoGEOutput. token_ids (the
    input's token ids, x's leading shape) are needed only by router="random".
    Call `end_step()` once per optimizer step (or `moge.end_step(model)` for every
    layer of a model): it applies the aux-loss-free bias update and resets the
    global-batch statistics. Where either is on (bias_update_rate > 0 or
    aux_loss_type="global_batch"), a layer that runs END_STEP_WARN_CALLS training calls
    without it warns once (EndStepWarning): the bias would never move and the counts
    would grow without end. With aux_loss_type="global_batch" and several micro-batches
    per step, run them first inside `moge.counting_pass(model)`: each micro-batch's loss
    then uses the whole step's counts (without it: the counts of the step so far).
    For a layer that returns a tensor, see moge.MoGEMLP.
    """

    # Training calls without end_step() before the warning; gradient accumulation of up
    # to this many micro-batches per optimizer step stays silent.
    END_STEP_WARN_CALLS = 64
    load_accum_E: Tensor  # buffers (see __init__); annotated for type checkers
    _local_load_E: Tensor

    def __init__(self, config: MoGEConfig) -> None:
        super().__init__()
        c = self.config = config
        # Debug: raise at a NaN/Inf input. Off by default: the check costs a reduction
        # and a host sync per call.
        self.check_finite = False
        # False: skip the balance and z losses (lb_loss, z_loss, aux_loss come back 0), for
        # callers that read only the hidden output (MoGETransformer.generate's decoding).
        self.compute_losses = True
        self.settings = RouterSettings(
            router=c.router, top_k=c.top_k, num_groups=c.num_groups, topk_groups=c.topk_groups,
            group_score=c.group_score, normalize_weights=c.normalize_weights, route_scale=c.route_scale,
        )  # fmt: skip
        # Every sub-module draws its weights with init_std in its own reset_parameters(), so
        # a module-by-module init loop (FSDP) gives what this layer's init gives.
        self.router = Router(c.d_model, c.num_experts, c.init_std)
        self.experts = GroupedExperts(c.num_experts, c.d_model, c.expert_hidden, c.expert_impl, c.init_std)
        # One group per chunk of the fused path: under the grouped router every chunk
        # then holds exactly T*K/M slots, so its buffers have the same size every call.
        self.experts.experts_per_chunk = c.experts_per_group
        self.shared = SwiGLU(c.d_model, c.shared_width, c.init_std) if c.shared_width else None
        gate = NormalLinear(c.d_model, 1, bias=False, init_std=c.init_std) if c.shared_expert_gate else None
        self.shared_gate = gate
        self.expert_scale_E = nn.Parameter(torch.ones(c.num_experts)) if c.learned_expert_scale else None
        self.init_buffers()
        # `step_calls` is how many calls (micro-batches times ranks) the step's counts span.
        self.step_calls = 0
        # A counting pass (moge.counting_pass) fills the step's counts before the training
        # pass, which then counts nothing and weighs every call with the whole step's f.
        # This rank's own calls and slots of each pass, to check that both routed alike.
        self.counted_ahead = False
        self._local_calls = 0
        self._counted: tuple[int, Tensor] | None = None  # (calls, slots [E]) of the counting pass
        self.calls_since_end_step = 0
        self._warned_end_step = False
        # Activation checkpointing (moge.model.recompute) runs forward twice; the second run
        # must not count again. `recompute_phase` is "forward" or "recompute" inside a
        # checkpointed call (None outside); the counts each first run used wait in
        # `_replay_counts` (with the calls they span) for its recompute, so the loss's
        # gradient is the same. Inside a checkpointed call `_replay_counts` is that call's
        # own queue (moge.model.recompute), so recomputes in any order replay their own.
        self.recompute_phase: str | None = None
        self._replay_counts: list[tuple[Tensor, int]] = []
        self._init_parameters()
        self.register_load_state_dict_post_hook(_init_meta_buffers_after_load)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Create the buffers, which follow from the config alone, on the default device,
        then move them to `device` (None: they stay there). A layer built on the meta
        device gets real ones from this once its parameters are allocated
        (moge.distributed.parallelize.materialize); `load_state_dict(sd, assign=True)` into
        one calls it itself for those still on meta (init_meta_buffers)."""
        c = self.config
        if c.bias_update_rate > 0:
            self.register_buffer("balance_bias_E", torch.zeros(c.num_experts, dtype=torch.float32))
        else:
            self.balance_bias_E = None
        # Slots per expert since the last end_step() (every rank's, through step_load):
        # feeds the bias rule and the global-batch loss. Not saved: checkpoints are taken
        # between steps.
        self.register_buffer("load_accum_E", torch.zeros(c.num_experts, dtype=torch.int64), persistent=False)
        # This rank's own slots of the step (compared between a counting and a training pass).
        self.register_buffer("_local_load_E", torch.zeros(c.num_experts, dtype=torch.int64), persistent=False)
        if c.two_level:  # PanGu-Sigma
            table, columns = layer_tables(c)
            self.register_buffer("rre_table_VK", table, persistent=False)
            self.register_buffer("rre_columns_NK", columns, persistent=False)
        elif c.router == "random":
            assert c.rre_vocab_size is not None, "MoGEConfig requires rre_vocab_size for the random router"
            table = make_random_routing_table(
                c.rre_vocab_size, c.num_experts, c.num_groups, c.top_k, c.rre_seed
            )
            self.register_buffer("rre_table_VK", table, persistent=False)
        else:
            self.rre_table_VK = None
        if device is not None:
            for name, buf in self.named_buffers(recurse=False):
                setattr(self, name, buf.to(device))

    def reset_parameters(self) -> None:
        """Re-initialise the parameters and re-create the buffers (on the parameters'
        device): after a meta-device build and `to_empty`, the usual
        `layer.reset_parameters()` leaves no buffer holding uninitialised memory (the
        random router's table, the load counts, the balance bias)."""
        self._init_parameters()
        self.init_buffers(self.router.weight.device)

    def _init_parameters(self) -> None:
        """Each sub-module's own reset_parameters() (the stds it holds: config.init_std, or
        a model's, MoGETransformer.init_weights), so that this and a module-by-module loop
        draw alike; the learned expert scale 1."""
        self.router.reset_parameters()
        self.experts.reset_parameters()
        for m in (self.shared, self.shared_gate):
            if m is not None:
                m.reset_parameters()
        if self.expert_scale_E is not None:
            nn.init.ones_(self.expert_scale_E)

    def _apply(self, fn, recurse=True):
        """nn.Module's conversions (`.to(dtype)`, `.half()`, `.bfloat16()`), except that the
        balance bias stays float32 (exactly its values) when the layer goes to a narrower
        float: the sign rule adds steps of bias_update_rate, which a bf16 bias of 0.03 or
        more would round away (as transformers keeps DeepSeek-V3's correction bias float32)."""
        bias_E = self._buffers.get("balance_bias_E")
        out = super()._apply(fn, recurse)
        new_E = self._buffers.get("balance_bias_E")
        if bias_E is not None and new_E is not None and new_E.dtype in (torch.float16, torch.bfloat16):
            # The float32 values as they were where there are some (not on meta), on the new device.
            exact = bias_E.dtype == torch.float32 and not bias_E.is_meta
            self._buffers["balance_bias_E"] = bias_E.to(new_E.device) if exact else new_E.float()
        return out

    # -- forward pieces ------------------------------------------------------------

    def _check_input(self, x: Tensor, token_ids: Tensor | None) -> None:
        D = self.config.d_model
        if not torch.is_floating_point(x):
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != D:
            raise ValueError(f"d_model: x's last dimension is {tuple(x.shape)[-1:]} but d_model={D}")
        if token_ids is not None and token_ids.shape != x.shape[:-1]:
            raise ValueError(
                f"token_ids: expected shape {tuple(x.shape[:-1])} (x without d_model), got {tuple(token_ids.shape)}"
            )
        # x must have the experts' dtype; the router's may differ: a float32 router beside
        # bf16 experts (as transformers keeps DeepSeek-V3's gate.weight) casts both operands
        # to float32 for its logits, whichever is narrower.
        experts_w, router_w = self.experts.w_gate_up_EDH.dtype, self.router.weight.dtype
        w = str(experts_w) if experts_w == router_w else f"experts {experts_w}, router {router_w}"
        if x.dtype == torch.float64 and experts_w != torch.float64:
            raise ValueError(
                f"x: dtype {x.dtype} is wider than the layer's parameters ({w}); cast x or the layer"
            )
        if x.dtype != experts_w and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x: dtype {x.dtype} differs from the layer's parameters ({w}); "
                             "cast x or the layer, or run under torch.autocast")  # fmt: skip
        if self.check_finite:
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                raise ValueError(
                    f"x: {int(bad.sum())} non-finite values (NaN/Inf) in the input of shape {tuple(x.shape)}"
                )

    def _router_scores(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and scores [T, E] in float32 whatever the input or autocast dtype."""
        logits_TE = self.router(x_TD)
        return logits_TE, compute_scores(logits_TE, self.config.score_func)

    def _input_dtype_router_scores(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """router_dtype "input": logits [T, E] in the compute dtype (the input's, or
        autocast's), as the released code does; scores [T, E] in float32 as there."""
        dtype = self._compute_dtype(x_TD)
        logits_TE = self.router(x_TD, dtype)
        return logits_TE, compute_scores(logits_TE, self.config.score_func)

    def _balance_loss(
        self,
        scores_TE: Tensor,
        ids_TK: Tensor,
        load_E: Tensor,
        lead: tuple,
        mask_T: Tensor | None,
        step: tuple[Tensor, int],
    ) -> Tensor:
        """The unweighted balance loss over the real tokens (mask_T True; None: all).

        step: the step's counts [E] and the calls they span, as this call sees them."""
        c = self.config
        if c.score_func == "sigmoid" and c.aux_loss_type != "released":
            # As DeepSeek-V3's balance loss: each token's affinities normalised to sum to 1,
            # so p means a share (1.0 at balance) and the loss cannot fall by shrinking every
            # score at once.
            scores_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        if c.aux_loss_type == "sequence" and len(lead) >= 2:
            L = lead[-1]
            return balance.sequence_balance_loss(
                rearrange(scores_TE, "(b l) e -> b l e", l=L),
                rearrange(ids_TK, "(b l) k -> b l k", l=L),
                c.num_experts,
                mask_BL=None if mask_T is None else rearrange(mask_T, "(b l) -> b l", l=L),
            )
        real_TE = scores_TE if mask_T is None else scores_TE[mask_T]
        if c.aux_loss_type == "released":  # this layer's rows; a model pools its layers (total_aux_loss)
            return balance.released_balance_loss([real_TE], c.top_k)
        if c.aux_loss_type == "global_batch" and self.training:
            counts_E, calls = step
            return balance.global_batch_balance_loss(real_TE, counts_E, c.top_k, calls)
        return balance.balance_loss_from_counts(real_TE, load_E, real_TE.shape[0], c.top_k)

    def _count_load(self, load_E: Tensor) -> tuple[Tensor, int]:
        """Add a training call's load to the step's counts once; returns the step's counts
        and the calls they span as this call sees them: the whole step's after a counting
        pass, else the step so far (a recompute replays what its first run saw)."""
        if self.counted_ahead:
            if self.recompute_phase != "recompute":
                self._count_local(load_E)
            return self.load_accum_E, self.step_calls
        if self.recompute_phase == "recompute":
            return self._replay_counts.pop(0)
        self.load_accum_E += self.step_load(load_E)
        self.step_calls += self.step_ranks()
        self._count_local(load_E)
        self._count_call()
        if self.recompute_phase == "forward":
            self._replay_counts.append((self.load_accum_E.clone(), self.step_calls))
        return self.load_accum_E, self.step_calls

    def _count_local(self, load_E: Tensor) -> None:
        """This rank's calls and slots in the current pass; after a counting pass the
        training pass may not run more calls than it counted."""
        if self._counted is not None and self._local_calls == self._counted[0]:
            raise RuntimeError(
                f"MoGELayer: the counting pass of this step ran {self._counted[0]} training calls and "
                f"this is call {self._local_calls + 1}: run the same micro-batches in both passes, then "
                "end_step() (moge.counting_pass)"
            )
        self._local_calls += 1
        self._local_load_E += load_E

    def drop_over_capacity(
        self,
        scores_TE: Tensor,
        weights_TK: Tensor,
        ids_TK: Tensor,
        mask_T: Tensor | None,
        free_TK: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Zero the gates of the slots over capacity (moge.capacity); -> (weights, dropped [E]).

        free_TK [T, K] bool or None: slots that take no room and never count as dropped (gate
        0 already: moge.diagnostics.knockout's removed experts)."""
        c = self.config
        assert c.capacity_factor is not None  # only called with a capacity
        if c.capacity_scope == "group":
            buckets, bucket_TK = c.num_groups, ids_TK // c.experts_per_group
        else:
            buckets, bucket_TK = c.num_experts, ids_TK
        real = ids_TK.shape[0] if mask_T is None else int(mask_T.sum())
        room = capacity.bucket_capacity(real * c.top_k, buckets, c.capacity_factor)
        n = buckets
        if free_TK is not None:  # an extra bucket of their own
            bucket_TK, n = bucket_TK.masked_fill(free_TK, buckets), buckets + 1
        keep_TK = capacity.keep_within_capacity(scores_TE.gather(1, ids_TK), bucket_TK, n, room, mask_T)
        lost_TK = ~keep_TK if mask_T is None else ~keep_TK & mask_T[:, None]
        if free_TK is not None:
            lost_TK &= ~free_TK
        dropped_E = balance.expert_load(ids_TK[lost_TK], c.num_experts)
        return torch.where(keep_TK, weights_TK, torch.zeros_like(weights_TK)), dropped_E

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        return compute_dtype(x)

    def route_tokens(
        self,
        x_TD: Tensor,
        token_ids: Tensor | None,
        lead: tuple,
        domain_ids: Tensor | None = None,
        mask_T: Tensor | None = None,
    ) -> MoGEOutput:
        """The router half of forward: logits, scores, selection, gates, load, losses.

        x_TD [T, D], token_ids [...] or None, lead = x's leading shape, mask_T [T] bool
        (False: padding, left out of every loss, count and statistic) or None. Returns a
        MoGEOutput whose `hidden` is x_TD itself (the experts have not run yet).
        """
        c = self.config
        columns_NK = getattr(self, "rre_columns_NK", None)
        # The two-level router's gates do not read the scores, so its balance and z losses are
        # statistics only: through the router their gradient would move nothing but the
        # hidden states (and the unused router weight). The scores are taken without a graph.
        with torch.no_grad() if columns_NK is not None else contextlib.nullcontext():
            if c.router_dtype == "input":
                logits_TE, scores_TE = self._input_dtype_router_scores(x_TD)
            else:
                logits_TE, scores_TE = self._router_scores(x_TD)
        tokens_T = token_ids.reshape(-1) if token_ids is not None else None
        if columns_NK is not None:  # PanGu-Sigma: domain, then token id
            if token_ids is None:
                raise ValueError("token_ids: the two-level random router routes by token id; pass token_ids")
            table_VK = self.rre_table_VK
            assert table_VK is not None, "registered with rre_columns_NK"
            weights_TK, ids_TK = two_level_route(token_ids, domain_ids, table_VK, columns_NK, c.route_scale)
        else:
            weights_TK, ids_TK = route(
                scores_TE,
                self.settings,
                bias=self.balance_bias_E,
                token_ids=tokens_T,
                table_VK=self.rre_table_VK,
            )
        if self.expert_scale_E is not None:
            # index_select, not [ids_TK]: the same values, its forward and backward about a
            # quarter faster than advanced indexing's (CPU, [T, K] ids).
            scale_TK = self.expert_scale_E.to(weights_TK.dtype).index_select(0, ids_TK.reshape(-1))
            weights_TK = weights_TK * scale_TK.view(ids_TK.shape)
        load_E = balance.expert_load(ids_TK if mask_T is None else ids_TK[mask_T], c.num_experts)
        step = self._count_load(load_E) if self.training else (self.load_accum_E, self.step_calls)
        dropped_E = None
        if c.capacity_factor is not None:
            weights_TK, dropped_E = self.drop_over_capacity(scores_TE, weights_TK, ids_TK, mask_T)
        if self.compute_losses:
            lb_loss = self._balance_loss(scores_TE, ids_TK, load_E, lead, mask_T, step)
            z_logits_TE = logits_TE if mask_T is None else logits_TE[mask_T]
            # Off (coefficient 0), the z-loss is still reported but needs no backward.
            z_loss = balance.router_z_loss(z_logits_TE if c.z_loss_coef else z_logits_TE.detach())
            aux_loss = c.aux_loss_coef * lb_loss + c.z_loss_coef * z_loss
        else:
            lb_loss = z_loss = aux_loss = scores_TE.new_zeros(())
        return MoGEOutput(
            hidden=x_TD, aux_loss=aux_loss,
            expert_ids=ids_TK, weights=weights_TK, load=load_E, scores=scores_TE, lb_loss=lb_loss, z_loss=z_loss,
            token_mask=mask_T, dropped=dropped_E,
        )  # fmt: skip

    def _routed_experts(self, x_TD: Tensor, out: MoGEOutput, dtype: torch.dtype) -> Tensor:
        """The routed experts' sum [T, D]; padded tokens skip them unless dispatch_padding."""
        mask_T = out.token_mask
        if mask_T is None or self.config.dispatch_padding:
            return self._run_experts(x_TD, out.expert_ids, out.weights, dtype)
        keep_R = mask_T.nonzero().squeeze(1)
        y_RD = self._run_experts(x_TD[keep_R], out.expert_ids[keep_R], out.weights[keep_R], dtype)
        return y_RD.new_zeros(x_TD.shape).index_copy(0, keep_R, y_RD)

    def _run_experts(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, dtype: torch.dtype) -> Tensor:
        """self.experts (which picks its path: fused, grouped_mm, loop, or a few tokens)."""
        return self.experts(x_TD, ids_TK, weights_TK, dtype)

    def forward(
        self,
        x: Tensor,
        token_ids: Tensor | None = None,
        domain_ids: Tensor | None = None,
        *,
        mask: Tensor | None = None,
    ) -> MoGEOutput:
        """x [..., D] (token_ids [...] for router="random"; domain_ids [...] with rre_domain_groups) -> MoGEOutput.

        mask [...] bool (x's leading shape; True: a real token, False: padding) or None:
        padded tokens count in no loss, load, bias update or statistic, and skip the
        routed experts (their routed output is 0) unless dispatch_padding is set.
        """
        self._check_input(x, token_ids)
        c = self.config
        lead = tuple(x.shape[:-1])
        x_TD = x.reshape(-1, c.d_model)
        mask_T = None
        if mask is not None:
            if mask.shape != x.shape[:-1] or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask: expected a bool tensor of shape {tuple(lead)} (x without d_model), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            mask_T = mask.reshape(-1)
        out = self.route_tokens(x_TD, token_ids, lead, domain_ids, mask_T)
        dtype = self._compute_dtype(x)
        y_TD = self._routed_experts(x_TD, out, dtype)
        if self.shared is not None:
            shared_TD = self.shared(x_TD.to(dtype))
            if self.shared_gate is not None:  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared(x)
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD.to(dtype)))
            y_TD = y_TD + shared_TD
        out.hidden = y_TD.reshape(*lead, c.d_model)
        return out

    def step_load(self, load_E: Tensor) -> Tensor:
        """The slots per expert this call adds to the step's count; a data-parallel
        wrapper (moge.distributed) returns the sum over every rank's tokens here."""
        return load_E

    def step_ranks(self) -> int:
        """How many ranks' calls one step_load sums (1 here; the data-parallel world there)."""
        return 1

    # -- counting pass (moge.counting_pass) ------------------------------------------

    def begin_counting_pass(self) -> None:
        """Before a counting pass: the layer trains and its step has counted no call yet."""
        if not self.training:
            raise ValueError(
                "counting_pass: the layer is in eval mode, which counts nothing; call model.train()"
            )
        if self.step_calls or self.counted_ahead:
            raise ValueError(
                f"counting_pass: this step has already counted {self.step_calls} calls; run the "
                "counting pass first in the step, after the previous step's end_step()"
            )

    def end_counting_pass(self) -> None:
        """After a counting pass: the step's counts are complete; the training pass adds nothing."""
        self.counted_ahead = True
        self._counted = (self._local_calls, self._local_load_E.clone())
        self._local_calls = 0
        self._local_load_E.zero_()

    def _check_counted_step(self) -> None:
        """At end_step: warn if the training pass did not route what the counting pass counted."""
        if self._counted is None:
            return
        calls, load_E = self._counted
        if self._local_calls != calls or not torch.equal(self._local_load_E, load_E):
            warnings.warn(
                f"MoGELayer: the counting pass routed {calls} calls, {load_E.tolist()} slots per expert, "
                f"the training pass {self._local_calls} calls, {self._local_load_E.tolist()}; the "
                "global-batch loss and the bias used the counting pass's counts. Feed both passes the "
                "same micro-batches (a forward that is not deterministic can also differ).",
                CountingPassWarning,
                stacklevel=4,  # the caller of end_step (through its no_grad wrapper)
            )

    def _count_call(self) -> None:
        self.calls_since_end_step += 1
        c = self.config
        needs_end_step = c.bias_update_rate > 0 or c.aux_loss_type == "global_batch"
        if (
            needs_end_step
            and not self._warned_end_step
            and self.calls_since_end_step >= self.END_STEP_WARN_CALLS
        ):
            self._warned_end_step = True
            what = []
            if c.bias_update_rate > 0:
                what.append(f"the aux-loss-free bias (bias_update_rate={c.bias_update_rate}) never updates")
            if c.aux_loss_type == "global_batch":
                what.append("the global-batch load counts grow without end")
            warnings.warn(
                f"MoGELayer: {self.calls_since_end_step} training calls without end_step(): "
                f"{' and '.join(what)}. Call layer.end_step() (or moge.end_step(model)) once per "
                "optimizer step.",
                EndStepWarning,
                stacklevel=4,
            )

    @torch.no_grad()
    def end_step(self) -> None:
        """Once per optimizer step: aux-loss-free bias update, then reset the load counts."""
        self._check_counted_step()
        self.calls_since_end_step = 0
        # rate 0: a bias loaded from a checkpoint (DeepSeek-V3) stays as it is.
        if (
            self.balance_bias_E is not None
            and self.config.bias_update_rate > 0
            and int(self.load_accum_E.sum()) > 0
        ):
            new_E = balance.update_balance_bias(
                self.balance_bias_E, self.load_accum_E, self.config.bias_update_rate
            )
            self.balance_bias_E.copy_(new_E)
        self.load_accum_E.zero_()
        self.step_calls = self._local_calls = 0
        self._local_load_E.zero_()
        self.counted_ahead, self._counted = False, None


def init_meta_buffers(module: nn.Module, device: torch.device | str) -> None:
    """Re-create, on `device`, the buffers still on the meta device of every sub-module
    that has init_buffers (module included), keeping those that hold values.

    For `load_state_dict(sd, assign=True)` into a meta-device build: it assigns what the
    state dict holds (parameters, persistent buffers) and leaves the rest on meta (load
    counts, the random router's tables, a model's RoPE tables: derived from the config,
    never saved).
    """
    for m in module.modules():
        make = getattr(m, "init_buffers", None)
        own = dict(m.named_buffers(recurse=False))
        if not callable(make) or not any(b.is_meta for b in own.values()):
            continue
        make(device)
        for name, buf in own.items():
            if not buf.is_meta:  # assigned by the load: kept
                setattr(m, name, buf)


def _init_meta_buffers_after_load(layer: MoGELayer, incompatible_keys) -> None:
    """load_state_dict post hook: after `load_state_dict(sd, assign=True)` into a layer built
    on the meta device, the buffers no state dict carries (the load counts, the random
    router's tables) would stay on meta; they are made here, on the router's device."""
    if not layer.router.weight.is_meta:
        init_meta_buffers(layer, layer.router.weight.device)


def total_aux_loss(outputs: list[MoGEOutput], config: MoGEConfig) -> Tensor:
    """The aux loss of a model whose MoE layers returned `outputs` (all with `config`).

    The sum of every layer's aux_loss, except for aux_loss_type="released", where the
    balance term is, as in the released code, one loss over all layers' rows pooled:
    aux_loss_coef * balance.released_balance_loss(all scores) + z_loss_coef * sum z_loss.
    """
    if not outputs:
        return torch.zeros(())
    if config.aux_loss_type != "released":
        return torch.stack([o.aux_loss for o in outputs]).sum()
    rows = [o.scores if o.token_mask is None else o.scores[o.token_mask] for o in outputs]
    lb = balance.released_balance_loss(rows, config.top_k)
    z = torch.stack([o.z_loss for o in outputs]).sum()
    return config.aux_loss_coef * lb + config.z_loss_coef * z
