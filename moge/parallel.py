"""Expert parallelism for the MoGE layer on torch.distributed.

Rank r of an expert-parallel group of W ranks holds the routed experts of groups
r, r+W, r+2W, ...; the router, shared experts, expert scales and balance bias are
replicated. Every rank routes its own tokens (data parallel inside the group); the
token-slots travel to their experts and back with two `all_to_all_single` calls,
which autograd runs in reverse. Under a router with a per-group quota (grouped,
random) every rank sends exactly T*K/W slots to every rank, so the splits are known
before routing and no counts are exchanged.

Legend: T tokens on this rank, K experts per token, S = T*K token-slots sent,
R token-slots received, D d_model, F expert hidden, H = 2F, E experts, M groups,
W ranks in the expert-parallel group, N groups per rank (M/W), J experts per rank
(E/W).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from moge._validate import check_int
from moge.experts import run_experts
from moge.layer import MoGEConfig, MoGELayer

BACKENDS = ("gloo", "nccl")
# Routers that take top_k/num_groups experts from every group: static splits.
QUOTA_ROUTERS = ("grouped", "random")
EXPERT_KEYS = ("experts.w_gate_up_EDH", "experts.w_down_EFD")


# --- process groups -------------------------------------------------------------------


@dataclass
class ParallelContext:
    """Where this process sits. ep_group None means the whole world; replica_group
    (the ranks holding the same experts, i.e. data-parallel replicas) None means none."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    expert_parallel: int  # ranks per expert-parallel group
    ep_group: dist.ProcessGroup | None = None
    replica_group: dist.ProcessGroup | None = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert_parallel

    @property
    def replicas(self) -> int:
        return self.world_size // self.expert_parallel


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name}: environment variable not set; launch with torchrun (or set it)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def _check_expert_parallel(expert_parallel: int, world_size: int) -> None:
    check_int("parallel.expert_parallel", expert_parallel, minimum=1)
    if world_size % expert_parallel:
        raise ValueError(
            f"parallel.expert_parallel: {expert_parallel} does not divide the {world_size} processes"
        )


def make_context(expert_parallel: int | None = None, backend: str | None = None) -> ParallelContext:
    """Build the expert-parallel and replica groups on an initialised default group.

    Ranks [k*W, (k+1)*W) form expert-parallel group k; ranks with the same r % W hold
    the same experts. Every process must call this (new_group is collective).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    W = world if expert_parallel is None else expert_parallel
    _check_expert_parallel(W, world)
    ep_group = replica_group = None
    if world > W:
        for k in range(world // W):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(k * W, (k + 1) * W)))
            ep_group = g if rank // W == k else ep_group
        for i in range(W):
            g = dist.new_group(list(range(i, world, W)))
            replica_group = g if rank % W == i else replica_group
    backend = backend or dist.get_backend()
    local_rank = _env_int("LOCAL_RANK", rank)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return ParallelContext(rank, world, local_rank, device, backend, W, ep_group, replica_group)


def init_distributed(
    backend: str | None = None,
    *,
    expert_parallel: int | None = None,
    init_method: str = "env://",
    timeout_s: float | None = None,
) -> ParallelContext:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    backend None: "nccl" when CUDA is available, else "gloo". expert_parallel None: all
    processes form one expert-parallel group; otherwise world_size / expert_parallel
    data-parallel replicas. init_method: "env://" or e.g. "file:///tmp/x" (tests).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend: nccl needs CUDA, which is not available; use gloo")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if not 0 <= rank < world:
        raise ValueError(f"RANK: {rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if expert_parallel is not None:
        _check_expert_parallel(expert_parallel, world)
    if init_method == "env://":
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"{name}: environment variable not set; launch with torchrun (or set it)")
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", rank))
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, **kw)
    return make_context(expert_parallel, backend)


def destroy() -> None:
    """Leave the process group (no-op when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- placement --------------------------------------------------------------------------


def expert_placement(num_experts: int, num_groups: int, world: int) -> Tensor:
    """Global expert ids held by each rank: groups r, r+W, ... -> [W, J] int64.

    Row r lists rank r's experts in its local order (group by group, ascending).
    """
    check_int("parallel.expert_parallel", world, minimum=1)
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups: {num_groups} groups do not divide num_experts={num_experts}")
    if num_groups % world:
        raise ValueError(
            f"parallel.expert_parallel: {world} ranks do not divide num_groups={num_groups}; "
            "every rank must hold the same number of whole groups"
        )
    G = num_experts // num_groups
    groups_WN = rearrange(torch.arange(num_groups), "(n w) -> w n", w=world)
    return rearrange(groups_WN[..., None] * G + torch.arange(G), "w n g -> w (n g)")


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

    def __init__(
        self, config: MoGEConfig, group=None, replica_group=None, static_splits: bool = False
    ) -> None:
        super().__init__()
        c = config
        self.group, self.replica_group, self.static_splits = group, replica_group, static_splits
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        placement_WJ = expert_placement(c.num_experts, c.num_groups, self.world)
        self.num_experts, self.num_local = c.num_experts, placement_WJ.shape[1]
        self.d_model, self.hidden, self.impl = c.d_model, c.expert_hidden, c.expert_impl
        flat = placement_WJ.reshape(-1)
        owner_E, local_E = torch.empty_like(flat), torch.empty_like(flat)
        owner_E[flat] = torch.arange(self.world).repeat_interleave(self.num_local)
        local_E[flat] = torch.arange(self.num_local).repeat(self.world)
        self.register_buffer("placement_WJ", placement_WJ, persistent=False)
        self.register_buffer("owner_E", owner_E, persistent=False)
        self.register_buffer("local_E", local_E, persistent=False)
        J, D, F = self.num_local, c.d_model, c.expert_hidden
        self.w_gate_up_EDH = nn.Parameter(torch.empty(J, D, 2 * F))
        self.w_down_EFD = nn.Parameter(torch.empty(J, F, D))
        self.last_exchange: ExchangeStats | None = None
        self.calls = 0  # forward calls so far
        self.count_exchanges = 0  # count all_to_alls so far (stays 0 with static splits)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.w_gate_up_EDH, std=std)
        nn.init.normal_(self.w_down_EFD, std=std)

    @property
    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.hidden

    # -- moving expert tensors between the full [E, ...] and the local [J, ...] layout --

    def shard(self, full_E: Tensor) -> Tensor:
        """This rank's rows of a full per-expert tensor: [E, ...] -> [J, ...]."""
        if full_E.shape[0] != self.num_experts:
            raise ValueError(
                f"expected {self.num_experts} experts on the first axis, got shape {tuple(full_E.shape)}"
            )
        return full_E.index_select(0, self.placement_WJ[self.rank].to(full_E.device))

    @torch.no_grad()
    def gather(self, local_J: Tensor) -> Tensor:
        """Every rank's rows put back in global order: [J, ...] -> [E, ...] (on all ranks)."""
        parts = [torch.empty_like(local_J) for _ in range(self.world)]
        dist.all_gather(parts, local_J.contiguous(), group=self.group)
        full_E = local_J.new_empty((self.num_experts,) + tuple(local_J.shape[1:]))
        full_E[self.placement_WJ.reshape(-1).to(full_E.device)] = torch.cat(parts)
        return full_E

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
        w1, w2 = self.w_gate_up_EDH.to(dtype), self.w_down_EFD.to(dtype)
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
        dtype = dtype or x_TD.dtype
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


def _resolve_static(router: str, static_splits: bool | None) -> bool:
    if static_splits is None:
        return router in QUOTA_ROUTERS
    if static_splits and router not in QUOTA_ROUTERS:
        raise ValueError(
            f"static_splits: the {router} router gives no per-group quota, so its splits vary "
            f"(static splits need one of {', '.join(QUOTA_ROUTERS)})"
        )
    return bool(static_splits)


class ExpertParallelMoGE(MoGELayer):
    """MoGELayer whose routed experts are spread over an expert-parallel group.

    Router, shared experts, expert_scale_E and balance_bias_E are full copies on every
    rank; `experts` holds this rank's groups only. forward has MoGELayer's semantics on
    this rank's tokens (aux losses are per rank, as under data parallelism; the
    global_batch statistics accumulate this rank's micro-batches). end_step() sums the
    load over `sync_group` (None: all processes), so every rank keeps the same bias.
    static_splits None: on for the quota routers; needs the same T on every rank.
    """

    def __init__(
        self,
        config: MoGEConfig,
        group=None,
        *,
        replica_group=None,
        sync_group=None,
        static_splits: bool | None = None,
    ) -> None:
        static = _resolve_static(config.router, static_splits)
        super().__init__(config)
        # Replaces the full GroupedExperts that MoGELayer built.
        self.experts = ExpertParallelExperts(config, group, replica_group, static)
        self.experts.reset_parameters(config.init_std)
        self.sync_group = sync_group

    @classmethod
    def from_layer(cls, layer: MoGELayer, group=None, **kwargs) -> ExpertParallelMoGE:
        """This rank's share of a full single-process layer (same config and weights)."""
        ref = layer.router.weight
        ep = cls(layer.config, group, **kwargs).to(device=ref.device, dtype=ref.dtype)
        ep.load_full_state_dict(layer.state_dict())
        return ep.train(layer.training)

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

    def gather_full_state_dict(self) -> dict:
        """The single-process state dict (experts gathered from every rank, on all ranks)."""
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for key in EXPERT_KEYS:
            sd[key] = self.experts.gather(sd[key])
        return sd

    @torch.no_grad()
    def end_step(self) -> None:
        """The bias update from the load of every rank's tokens, then reset the counts."""
        if self.balance_bias_E is not None:
            dist.all_reduce(self.load_accum_E, group=self.sync_group)
        super().end_step()


# --- whole models -------------------------------------------------------------------------


def _expert_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the rank-local expert parameters (e.g. for DDP to ignore)."""
    local = {id(p) for m in _expert_modules(model) for p in m.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in local]


@torch.no_grad()
def broadcast_replicated(model: nn.Module, group=None) -> None:
    """Copy every parameter and buffer from the group's first rank, except
    the rank-local experts (call before training so replicas start identical)."""
    src = 0 if group is None else dist.get_global_rank(group, 0)
    skip = {id(p) for m in _expert_modules(model) for p in m.parameters()}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in skip:
            dist.broadcast(t.data, src, group=group)


def parallelize_model(
    model: nn.Module, ctx: ParallelContext, *, broadcast: bool = True, static_splits: bool | None = None
) -> nn.Module:
    """Replace every MoGELayer of `model` by its ExpertParallelMoGE share, in place.

    broadcast: first copy all weights from rank 0, so the slices come from one model.
    Returns `model`. Works on MoGETransformer (ExpertParallelMoGE is a MoGELayer, so
    Block.forward and moe_layers() keep working) and on any module tree.
    """
    if broadcast:
        broadcast_replicated(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MoGELayer:
                ep = ExpertParallelMoGE.from_layer(
                    child, ctx.ep_group, replica_group=ctx.replica_group, static_splits=static_splits
                )
                setattr(parent, name, ep)
    return model


def _all_reduce_grads(params: list[nn.Parameter], group, scale: float) -> None:
    """Sum the grads over `group`, times `scale`, one flat buffer per device and dtype.
    Missing grads count as zeros so every rank reduces the same buffer."""
    buckets: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    for ps in buckets.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for p, g in zip(ps, flat.split([p.numel() for p in ps])):
            if p.grad is None:
                p.grad = g.view_as(p).clone()
            else:
                p.grad.copy_(g.view_as(p))


@torch.no_grad()
def average_replicated_grads(model: nn.Module, group=None) -> None:
    """Make the grads those of the mean of every rank's loss over `group` (None: all).

    Replicated parameters: mean over the group. Expert parameters already hold the sum
    over their expert-parallel group's ranks (every rank's tokens reached them through
    the exchange), so they are summed over the replicas holding the same experts and
    divided by the group size. Call after backward, before clipping and the step.
    """
    world = dist.get_world_size(group)
    experts = _expert_modules(model)
    local = {id(p) for m in experts for p in m.parameters()}
    replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in local]
    _all_reduce_grads(replicated, group, 1.0 / world)
    for m in experts:
        ps = [p for p in m.parameters() if p.requires_grad]
        if m.replica_group is not None:
            _all_reduce_grads(ps, m.replica_group, 1.0 / world)
        else:
            for p in ps:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad.div_(world)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group=None) -> Tensor:
    """Clip by the grad norm of the whole (single-process) model; returns that norm.

    Call after average_replicated_grads. Each rank's own norm differs (its experts
    differ), and clipping by it would scale the replicated grads differently on each
    rank and split the replicas; this norm is the same everywhere. Replicated grads
    count once, every expert once (each is held by world / W replicas of `group`).
    """
    world = dist.get_world_size(group)
    experts = _expert_modules(model)
    local = {id(p) for m in experts for p in m.parameters()}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    replicated_sq = torch.zeros((), dtype=torch.float32, device=device)
    expert_sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in model.parameters():
        if p.grad is not None and id(p) not in local:
            replicated_sq += p.grad.float().square().sum()
    for m in experts:
        copies = world // m.world  # ranks of `group` holding each of these experts
        for p in m.parameters():
            if p.grad is not None:
                expert_sq += p.grad.float().square().sum() / copies
    dist.all_reduce(expert_sq, group=group)
    norm = (replicated_sq + expert_sq).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm


def gather_model_state_dict(model: nn.Module) -> dict:
    """The single-process state dict of a parallelized model (experts gathered)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallelMoGE):
            for key in EXPERT_KEYS:
                full_key = f"{name}.{key}" if name else key
                sd[full_key] = m.experts.gather(sd[full_key])
    return sd


def load_model_state_dict(model: nn.Module, full_sd: dict, strict: bool = True):
    """Load a single-process state dict into a parallelized model (experts sliced)."""
    local = dict(full_sd)
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallelMoGE):
            for key in EXPERT_KEYS:
                full_key = f"{name}.{key}" if name else key
                if full_key in local:
                    try:
                        local[full_key] = m.experts.shard(local[full_key])
                    except ValueError as err:
                        raise ValueError(f"{full_key}: {err}") from None
    return model.load_state_dict(local, strict=strict)
