"""Expert parallelism for the MoGE layer on torch.distributed.

Rank r of an expert-parallel group of W ranks holds the routed experts of groups
r*N .. (r+1)*N - 1 (N = M/W); the router, shared experts, expert scales and balance
bias are replicated. Every rank routes its own tokens (data parallel inside the
group); the token-slots travel to their experts and back with two
`all_to_all_single` calls, which autograd runs in reverse. Under a router with a
per-group quota (grouped, random) every rank sends exactly T*K/W slots to every
rank, so the splits are known before routing and no counts are exchanged.

Legend: T tokens on this rank, K experts per token, S = T*K token-slots sent,
R token-slots received, D d_model, F expert hidden, H = 2F, E experts, M groups,
W ranks in the expert-parallel group, N groups per rank (M/W), J experts per rank
(E/W).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from moge._validate import check_int
from moge.dropin import MoGEMLP
from moge.experts import run_experts
from moge.kernels.precision import compute_dtype
from moge.layer import MoGEConfig, MoGELayer, MoGEOutput
from moge.model.init import init_buffers
from moge.routing import QUOTA_ROUTERS

# Routers that take top_k/num_groups experts from every group: static splits.
EXPERT_KEYS = ("experts.w_gate_up_EDH", "experts.w_down_EFD")


# --- placement --------------------------------------------------------------------------


def expert_placement(num_experts: int, num_groups: int, world: int) -> Tensor:
    """Global expert ids held by each rank: contiguous blocks of whole groups -> [W, J].

    Rank r holds groups r*N .. (r+1)*N - 1 (N = num_groups / W), i.e. experts
    r*J .. (r+1)*J - 1: the rows a Shard(0) DTensor over the "ep" mesh dimension holds.
    """
    check_int("parallel.expert_parallel", world, minimum=1)
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups: {num_groups} groups do not divide num_experts={num_experts}")
    if num_groups % world:
        raise ValueError(
            f"parallel.expert_parallel: {world} ranks do not divide num_groups={num_groups}; "
            "every rank must hold the same number of whole groups"
        )
    return torch.arange(num_experts).view(world, num_experts // world)


# --- the exchange -------------------------------------------------------------------------


def _exchange_raw(x: Tensor, send: list[int], recv: list[int], group, async_op: bool = False):
    """all_to_all_single along dim 0 without autograd; returns (out, work or None)."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group, async_op=async_op
    )
    return out, work


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange_raw(x, send, recv, group)[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _exchange_raw(grad, ctx.recv, ctx.send, ctx.group)[0], None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group=None) -> Tensor:
    """Differentiable all_to_all_single: send[i] rows of x to rank i, recv[i] from it.

    Every rank of `group` must call it, and (when x needs a gradient) run backward.
    """
    return _AllToAll.apply(x, list(send), list(recv), group)


def _inverse(order: Tensor) -> Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


@dataclass
class ExchangeStats:
    """What one forward call moved, seen from this rank (backward mirrors it)."""

    static: bool  # splits known in advance (quota router): no count exchange
    count_exchange: bool  # whether counts were exchanged before the tokens
    send_slots: tuple  # token-slots sent to each rank (dispatch)
    recv_slots: tuple  # token-slots received from each rank (dispatch)
    token_bytes: int  # payload bytes this rank sends over both exchanges
    meta_bytes: int  # bytes of counts (dynamic) or local expert indices (static) sent

    def as_dict(self) -> dict:
        return asdict(self)


# --- the expert-parallel experts ------------------------------------------------------------


class ExpertParallelExperts(nn.Module):
    """This rank's J experts, with dispatch to and combine from the other ranks.

    Same call as GroupedExperts: (x_TD, ids_TK global, weights_TK, dtype) -> y_TD.
    The parameter names are GroupedExperts' so state dicts line up, but their first
    axis holds only the J local experts: w_gate_up_EDH [J, D, H], w_down_EFD [J, F, D].
    """

    placement_WJ: Tensor  # buffers (register_buffer), declared so they type as tensors
    owner_E: Tensor
    local_E: Tensor

    def __init__(self, config: MoGEConfig, group=None, static_splits: bool = False) -> None:
        super().__init__()
        c = config
        self.group, self.static_splits = group, static_splits
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts, self.num_groups = c.num_experts, c.num_groups
        self.num_local = expert_placement(c.num_experts, c.num_groups, self.world).shape[1]
        self.d_model, self.hidden, self.impl = c.d_model, c.expert_hidden, c.expert_impl
        # reset_parameters()'s stds when none is given: gate/up, and down (as GroupedExperts';
        # from_layer copies a model's, which gives w_down_EFD a smaller one).
        self.init_std = self.down_std = c.init_std
        self.init_buffers()
        J, D, F = self.num_local, c.d_model, c.expert_hidden
        self.w_gate_up_EDH = nn.Parameter(torch.empty(J, D, 2 * F))
        self.w_down_EFD = nn.Parameter(torch.empty(J, F, D))
        # Multiplies the weights' gradient (the sum over every rank whose tokens came
        # here); moge.distributed.parallelize sets 1/W so that FSDP2's mean over "dp"
        # makes it the mean over all ranks (gloo has no PREMUL_SUM for FSDP2's own
        # gradient divide factor).
        self.grad_scale = 1.0
        self.last_exchange: ExchangeStats | None = None
        self.calls = 0  # forward calls so far
        self.count_exchanges = 0  # count all_to_alls so far (stays 0 with static splits)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """The placement tables, made on the default device (meta in a meta-device build),
        then moved to `device` (None: they stay there)."""
        placement_WJ = expert_placement(self.num_experts, self.num_groups, self.world)
        flat = placement_WJ.reshape(-1)
        owner_E, local_E = torch.empty_like(flat), torch.empty_like(flat)
        owner_E[flat] = torch.arange(self.world).repeat_interleave(self.num_local)
        local_E[flat] = torch.arange(self.num_local).repeat(self.world)
        for name, t in (("placement_WJ", placement_WJ), ("owner_E", owner_E), ("local_E", local_E)):
            self.register_buffer(name, t if device is None else t.to(device), persistent=False)

    def reset_parameters(self, std: float | None = None) -> None:
        """Weights ~ N(0, std); std None: w_gate_up_EDH ~ N(0, init_std), w_down_EFD ~
        N(0, down_std), as GroupedExperts (FSDP's meta-device materialisation calls
        reset_parameters() without arguments). The placement tables are re-created too, on
        the weights' device: after a meta-device build and to_empty they hold no values,
        and a module-by-module init loop calls nothing else here."""
        nn.init.normal_(self.w_gate_up_EDH, std=self.init_std if std is None else std)
        nn.init.normal_(self.w_down_EFD, std=self.down_std if std is None else std)
        self.init_buffers(self.w_gate_up_EDH.device)

    @property
    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.hidden

    def shard(self, full_E: Tensor) -> Tensor:
        """This rank's rows of a full per-expert tensor: [E, ...] -> [J, ...]."""
        if full_E.shape[0] != self.num_experts:
            raise ValueError(
                f"expected {self.num_experts} experts on the first axis, got shape {tuple(full_E.shape)}"
            )
        return full_E.index_select(0, self.placement_WJ[self.rank].to(full_E.device))

    # -- forward pieces --

    def _splits_static(self, key_S: Tensor) -> tuple:
        """Quota router: T*K/W slots to and from every rank -> (send, recv, (local_R,
        work), meta bytes). Each slot's local expert index travels alongside it in an
        exchange started here and waited for by the caller: no counts go first."""
        W, J, S = self.world, self.num_local, key_S.numel()
        assert S % W == 0 and bool((torch.bincount(key_S // J, minlength=W) == S // W).all()), (
            "a quota router sends T*K/W slots to every rank"
        )
        # Assumes every rank holds the same number of tokens (a fixed batch shape).
        split = [S // W] * W
        local_R, work = _exchange_raw((key_S % J).to(torch.int32), split, split, self.group, async_op=True)
        return split, split, (local_R, work), S * 4

    def _splits_counted(self, key_S: Tensor) -> tuple:
        """Any router: exchange the per-(rank, expert) counts first, so the token
        exchange can use uneven (or zero) splits. Same return as _splits_static."""
        W, J = self.world, self.num_local
        counts_WJ = torch.bincount(key_S, minlength=W * J)
        recv_WJ = _exchange_raw(counts_WJ, [J] * W, [J] * W, self.group)[0]
        self.count_exchanges += 1
        send = counts_WJ.view(W, J).sum(1).tolist()
        recv = recv_WJ.view(W, J).sum(1).tolist()
        # Received slots come source by source, expert by expert within a source.
        local_R = torch.arange(J, device=key_S.device).repeat(W).repeat_interleave(recv_WJ)
        return send, recv, (local_R, None), counts_WJ.numel() * counts_WJ.element_size()

    def _run_local(self, x_RD: Tensor, local_R: Tensor, dtype: torch.dtype) -> Tensor:
        """The local experts on the received slots, returned in received order."""
        w1: Tensor = self.w_gate_up_EDH
        w2: Tensor = self.w_down_EFD
        if self.grad_scale != 1.0:
            w1, w2 = _ScaleGrad.apply(w1, self.grad_scale), _ScaleGrad.apply(w2, self.grad_scale)
        w1, w2 = w1.to(dtype), w2.to(dtype)
        if x_RD.shape[0] == 0:
            # Nothing arrived; still hang on to x and the weights so this rank joins both
            # exchanges' backward (the other ranks wait for it) and gets zero expert grads.
            return x_RD + 0.0 * (w1.sum() + w2.sum())
        perm_R = local_R.argsort(stable=True)  # run_experts needs one block per expert
        counts_J = torch.bincount(local_R, minlength=self.num_local)
        y_RD = run_experts(x_RD.index_select(0, perm_R), w1, w2, counts_J, self.impl)
        return y_RD.index_select(0, _inverse(perm_R))

    def forward(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, dtype: torch.dtype | None = None
    ) -> Tensor:
        """y_t = sum_k weights[t, k] * expert_{ids[t, k]}(x_t), experts on their ranks.

        x_TD [T, D], ids_TK [T, K] global expert ids, weights_TK [T, K] -> y_TD [T, D].
        """
        dtype = dtype or compute_dtype(x_TD)  # autocast's where it is on, as the one-process experts
        K, J = ids_TK.shape[1], self.num_local
        flat_S = ids_TK.reshape(-1)
        # Sort by destination rank, then local expert: one contiguous block per rank.
        key_S = self.owner_E[flat_S] * J + self.local_E[flat_S]
        order_S = key_S.argsort(stable=True)
        key_S = key_S[order_S]
        splits = self._splits_static if self.static_splits else self._splits_counted
        send, recv, (local_R, work), meta_bytes = splits(key_S)
        x_SD = x_TD.to(dtype).index_select(0, order_S // K)
        x_RD = all_to_all(x_SD, send, recv, self.group)
        if work is not None:
            work.wait()
        y_RD = self._run_local(x_RD, local_R.long(), dtype)
        y_SD = all_to_all(y_RD, recv, send, self.group)
        y_TKD = rearrange(y_SD.index_select(0, _inverse(order_S)), "(t k) d -> t k d", k=K)
        self._record(send, recv, x_SD.element_size(), meta_bytes)
        return torch.einsum("tk,tkd->td", weights_TK.to(dtype), y_TKD)

    def _record(self, send: list[int], recv: list[int], elem: int, meta_bytes: int) -> None:
        self.calls += 1
        self.last_exchange = ExchangeStats(
            static=self.static_splits, count_exchange=not self.static_splits,
            send_slots=tuple(send), recv_slots=tuple(recv),
            token_bytes=(sum(send) + sum(recv)) * self.d_model * elem, meta_bytes=meta_bytes,
        )  # fmt: skip


# --- the layer --------------------------------------------------------------------------


def _resolve_static(config: MoGEConfig, static_splits: bool | None) -> bool:
    # The two-level random router (PanGu-Sigma, rre_domain_groups) sends a domain's tokens
    # to that domain's groups only: no per-group quota, so its splits follow the routing.
    two_level, quota = config.two_level, config.per_group_quota
    if static_splits is None:
        return quota
    if static_splits and not quota:
        router = "random router with rre_domain_groups" if two_level else f"{config.router} router"
        raise ValueError(
            f"static_splits: the {router} gives no per-group quota, so its splits vary "
            f"(static splits need one of {', '.join(QUOTA_ROUTERS)}, without rre_domain_groups)"
        )
    return bool(static_splits)


_STD_ATTRS = ("init_std", "down_std")  # what a module's reset_parameters() draws with


def _copy_init_stds(src: nn.Module, dst: nn.Module) -> None:
    """Give every sub-module of dst the init stds of src's sub-module of the same name.

    dst is built from src's config, so it holds the config's init_std; src may hold its
    owner's (MoGETransformer._set_init_stds: the model's init_std, a smaller one for
    w_down_EFD), which a module-by-module init loop on dst must draw with."""
    for name, m in dst.named_modules():
        try:
            twin = src.get_submodule(name)
        except AttributeError:
            continue  # a module only the parallel layer has
        for attr in _STD_ATTRS:
            if hasattr(m, attr) and hasattr(twin, attr):
                setattr(m, attr, getattr(twin, attr))


class GlobalLoadMoGE(MoGELayer):
    """MoGELayer on one rank of several that route their own tokens (data parallel).

    The slot counts of every call are summed over `sync_group` (None: every process)
    before they feed the step's count, so the global-batch balance loss sees the
    global batch's f_i (Eq. 8) and the aux-loss-free bias the global load; every rank
    keeps the same bias. Each rank's global-batch loss is its tokens' share times the
    step's calls (balance.global_batch_balance_loss), so the data-parallel gradient mean
    gives the one-process loss, no factor of the world size. Per-call losses ("batch",
    "sequence", "released") stay this rank's.
    """

    def __init__(self, config: MoGEConfig, sync_group=None) -> None:
        super().__init__(config)
        self.sync_group = sync_group

    @torch.no_grad()
    def step_load(self, load_E: Tensor) -> Tensor:
        total_E = load_E.clone()
        dist.all_reduce(total_E, group=self.sync_group)
        return total_E

    def step_ranks(self) -> int:
        return dist.get_world_size(self.sync_group)

    @classmethod
    def from_layer(cls, layer: MoGELayer, *args, **kwargs) -> GlobalLoadMoGE:
        """This rank's version of a single-process layer (same config, weights and init
        stds: those a model gave the layer's modules, so reset_parameters() draws alike).

        Built on the meta device, so no full expert tensor is allocated here; a layer on
        the meta device gives one on meta (its owner allocates and initialises it later,
        moge.distributed.parallelize.materialize), any other its share of its weights."""
        ref = layer.router.weight
        with torch.device("meta"):
            new = cls(layer.config, *args, **kwargs).to(dtype=ref.dtype)
        _copy_init_stds(layer, new)
        if not ref.is_meta:
            new.to_empty(device=ref.device)
            init_buffers(new, ref.device)
            new.load_full_state_dict(layer.state_dict())
        return new.train(layer.training)

    def load_full_state_dict(self, full_sd: dict, strict: bool = True):
        return self.load_state_dict(full_sd, strict=strict)


class ExpertParallelMoGE(GlobalLoadMoGE):
    """GlobalLoadMoGE whose routed experts are spread over an expert-parallel group.

    Router, shared experts, expert_scale_E and balance_bias_E are full copies on every
    rank; `experts` holds this rank's groups only. forward has MoGELayer's semantics on
    this rank's tokens. static_splits None: on for the quota routers (grouped, random
    without rre_domain_groups); needs the same T on every rank.
    """

    # Replaces MoGELayer's GroupedExperts with a module of the same call and parameter
    # names (not a subclass: it holds J of the E experts).
    experts: ExpertParallelExperts  # type: ignore[assignment]

    def __init__(
        self, config: MoGEConfig, group=None, *, sync_group=None, static_splits: bool | None = None
    ) -> None:
        static = _resolve_static(config, static_splits)
        super().__init__(config, sync_group)
        # Replaces the full GroupedExperts that MoGELayer built.
        self.experts = ExpertParallelExperts(config, group, static)
        self.experts.reset_parameters(config.init_std)

    @property
    def last_exchange(self) -> ExchangeStats | None:
        return self.experts.last_exchange

    def shard_state_dict(self, full_sd: dict) -> dict:
        """A full (single-process) state dict with the experts cut down to this rank's."""
        local = dict(full_sd)
        for key in EXPERT_KEYS:
            if key in local:
                try:
                    local[key] = self.experts.shard(local[key])
                except ValueError as err:
                    raise ValueError(f"{key}: {err}") from None
        return local

    def load_full_state_dict(self, full_sd: dict, strict: bool = True):
        return self.load_state_dict(self.shard_state_dict(full_sd), strict=strict)

    def _routed_experts(self, x_TD: Tensor, out: MoGEOutput, dtype: torch.dtype) -> Tensor:
        """Static splits send T*K/W slots to every rank, the same T on every rank, so
        padded tokens cannot stay home (dispatch_padding false): they travel as zeros with
        gate 0, and their routed output is 0 as when they skip the experts. Counted splits
        skip them (MoGELayer)."""
        mask_T = out.token_mask
        if mask_T is None or self.config.dispatch_padding or not self.experts.static_splits:
            return super()._routed_experts(x_TD, out, dtype)
        keep_T1 = mask_T[:, None]
        # Zero inputs (a bias-free expert gives 0 on 0, whatever the padding held) and zero
        # gates: a padded slot adds exactly 0 to the output and to every gradient.
        x_TD = torch.where(keep_T1, x_TD, torch.zeros_like(x_TD))
        weights_TK = torch.where(keep_T1, out.weights, torch.zeros_like(out.weights))
        return self.experts(x_TD, out.expert_ids, weights_TK, dtype)


# --- the drop-in MLP ------------------------------------------------------------------------


class GlobalLoadMoGEMLP(GlobalLoadMoGE, MoGEMLP):
    """GlobalLoadMoGE that returns the output tensor and keeps its aux losses, as moge.MoGEMLP."""


class ExpertParallelMoGEMLP(ExpertParallelMoGE, MoGEMLP):
    """ExpertParallelMoGE that returns the output tensor and keeps its aux losses, as moge.MoGEMLP."""
