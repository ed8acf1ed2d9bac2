"""The parallel plan, applied to a model from outside: the model knows nothing of it.

On a ("dp", "ep") mesh of dp * ep ranks (moge.distributed.mesh), as torchtitan does:

- routed experts: expert parallelism over "ep" (rank e holds experts e*J .. (e+1)*J - 1,
  tokens travel by moge's own all-to-all), then FSDP2 over "dp" (each of the dp ranks
  holding the same experts keeps a slice of their second axis, Shard(1));
- everything else (embeddings, attention, norms, router, shared experts, expert
  scales, the LM head): FSDP2 over all dp * ep ranks (Shard(0)), one unit per block
  plus the root;
- every MoGE layer sums its slot counts over all ranks (GlobalLoadMoGE);
- with mixed_precision (parallel.mixed_precision), FSDP2's MixedPrecisionPolicy: the
  blocks' and experts' parameters are all-gathered in bf16 and their gradients
  reduce-scattered in float32, while the router (whose logits and scores are float32,
  as in the released code) and the root's embedding, final norm and LM head keep
  float32 parameters; block inputs are not cast, so the residual stream stays float32
  as under autocast. The shards, the optimizer and the checkpoints stay float32.

Gradients: FSDP2 reduce-scatters and averages them over each parameter's mesh. An
expert's gradient already holds the sum over the ep ranks whose tokens reached it, so
the expert layer scales it by 1/ep first: every gradient is then that of the mean
loss over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

# What DTensor itself (and DCP) computes for a shard's place in the whole tensor.
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moge.distributed.expert_parallel import (
    ExpertParallelExperts,
    ExpertParallelMoGE,
    ExpertParallelMoGEMLP,
    GlobalLoadMoGE,
    GlobalLoadMoGEMLP,
)
from moge.distributed.mesh import World, check_expert_shards
from moge.dropin import MoGEMLP
from moge.layer import MoGELayer
from moge.model.init import init_buffers


def local(t: Tensor) -> Tensor:
    """This rank's part of t (t itself unless t is a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _mesh(world: World) -> DeviceMesh:
    # Only a world of several processes gets here (parallelize returns early on one).
    assert world.mesh is not None, "a world of one process has no mesh"
    return world.mesh


# Each single-process MoGE layer type -> (its expert-parallel, its global-load version).
_PARALLEL_TYPES: dict[type, tuple[type[ExpertParallelMoGE], type[GlobalLoadMoGE]]] = {
    MoGELayer: (ExpertParallelMoGE, GlobalLoadMoGE),
    MoGEMLP: (ExpertParallelMoGEMLP, GlobalLoadMoGEMLP),
}


def _swap_layers(model: nn.Module, world: World, static_splits: bool | None) -> None:
    ep_group = _mesh(world)["ep"].get_group()
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, MoGELayer) or isinstance(child, GlobalLoadMoGE):
                continue  # not a MoGE layer, or one made parallel already
            if type(child) not in _PARALLEL_TYPES:
                # Left as it is, it would count only this rank's load (each rank's balance
                # bias drifting apart) and hold every expert: refused, not left silently.
                raise ValueError(
                    f"{prefix + '.' if prefix else ''}{name}: parallelize has parallel versions of "
                    f"MoGELayer and MoGEMLP, not of their subclass {type(child).__name__}"
                )
            expert_parallel, global_load = _PARALLEL_TYPES[type(child)]
            if world.shape.ep > 1:
                new = expert_parallel.from_layer(child, ep_group, static_splits=static_splits)
            else:
                new = global_load.from_layer(child)
            setattr(parent, name, new)


# bf16 parameters for the blocks' products, float32 gradient reduction; inputs are
# left as they come (the float32 residual stream, as under autocast).
BF16_PARAMS = MixedPrecisionPolicy(
    param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
)
FLOAT32 = MixedPrecisionPolicy()  # parameters used as they are stored


def _shard_experts(layer: ExpertParallelMoGE, world: World, policy: MixedPrecisionPolicy) -> None:
    # Shard(1): the first axis is already cut by "ep"; the checkpoint view stays one
    # DTensor over the 2-D mesh ([Shard(1), Shard(0)] on ("dp", "ep")).
    c = layer.config
    check_expert_shards(world.shape, c.d_model, c.expert_hidden, "parallel.data_parallel")
    fully_shard(
        layer.experts, mesh=_mesh(world)["dp"], shard_placement_fn=lambda p: Shard(1), mp_policy=policy
    )
    layer.experts.grad_scale = 1.0 / world.shape.ep  # FSDP2 then divides by dp: the world mean


def _keep_routers_float32(module: nn.Module, world: World) -> None:
    """The MoGE layers' routers as FSDP2 units of their own, float32 parameters."""
    for m in module.modules():
        if isinstance(m, MoGELayer):
            fully_shard(m.router, mesh=world.fsdp_mesh, mp_policy=FLOAT32)


def parallelize(
    model: nn.Module, world: World, static_splits: bool | None = None, mixed_precision: bool = False
) -> nn.Module:
    """Apply the plan (module docstring) to `model` in place; returns it.

    A world of one process is left as it is (there, train.dtype bfloat16 is autocast
    alone). `model` is either on the meta device (training: then `materialize`
    allocates and initialises this rank's shards) or the same full model on every rank
    (each keeps its share). Expects MoGETransformer's structure (`blocks`), or any
    module holding MoGELayer or MoGEMLP (the drop-in MLP) layers anywhere.
    """
    if world.size == 1:
        return model
    policy = BF16_PARAMS if mixed_precision else FLOAT32
    _swap_layers(model, world, static_splits)
    if mixed_precision:  # innermost units first, as FSDP2 nests them
        _keep_routers_float32(model, world)
    for block in getattr(model, "blocks", []):
        ffn = getattr(block, "ffn", None)
        if isinstance(ffn, ExpertParallelMoGE):
            _shard_experts(ffn, world, policy)
        fully_shard(block, mesh=world.fsdp_mesh, mp_policy=policy)
    for m in model.modules():  # MoGE layers outside blocks (a bare layer)
        if isinstance(m, ExpertParallelMoGE) and not isinstance(m.experts, FSDPModule):
            _shard_experts(m, world, policy)
    fully_shard(model, mesh=world.fsdp_mesh)  # embedding, final norm, LM head: float32
    return model


# ---------------------------------------------------------------- gradient norm


def _expert_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


def _norm_sq(grads: list[Tensor], device: torch.device) -> Tensor:
    """Squared 2-norm of DTensor or plain grads, summed over their meshes' shards."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.float().square()


@torch.no_grad()
def grad_norm(model: nn.Module, world: World) -> Tensor:
    """The 2-norm of the whole model's gradient, the same value on every rank.

    The FSDP2 parameters' norms are DTensor reductions over their meshes; an expert
    parameter's mesh ("dp") covers only this rank's experts, so those squares are
    also summed over "ep" (each expert counted once).
    """
    experts = _expert_params(model)
    grads = [(id(p), p.grad) for p in model.parameters() if p.grad is not None]
    sq = _norm_sq([g for i, g in grads if i not in experts], world.device)
    expert_sq = _norm_sq([g for i, g in grads if i in experts], world.device)
    if experts:
        dist.all_reduce(expert_sq, group=_mesh(world)["ep"].get_group())
    return (sq + expert_sq).sqrt()


@torch.no_grad()
def clip_grads_(model: nn.Module, max_norm: float, norm: Tensor) -> None:
    """Scale every gradient by min(1, max_norm / norm) (torch's own clip, DTensor-aware).

    One call per mesh: DTensor ops do not mix meshes (experts live on "dp")."""
    by_mesh: dict[object, list[Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


# ---------------------------------------------------------------- checkpoint views


def _expert_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Parameter name -> its expert-parallel module."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            out.update({f"{prefix}.{n}": m for n, _ in m.named_parameters()})
    return out


def _global_expert_view(t: Tensor, m: ExpertParallelExperts, world: World) -> DTensor:
    """This rank's piece of an expert tensor as a DTensor of the full [E, ...] shape.

    t: the parameter (or a moment laid out like it): a DTensor on "dp" holding
    [J, ...] whose second axis FSDP2 sliced, or the plain [J, ...] tensor.
    """
    shape = (m.num_experts, *t.shape[1:])
    dp_place = t.placements[0] if isinstance(t, DTensor) else Replicate()
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local(t), world.mesh, [dp_place, Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
    )


def checkpoint_views(model: nn.Module, world: World) -> dict[str, Callable[[Tensor], Tensor]]:
    """Parameter name -> a function mapping that parameter (or a tensor laid out like
    it: an AdamW moment) to what a checkpoint stores: the whole model's tensor,
    as a DTensor when it is sharded. Names absent here are stored as they are."""
    return {
        name: partial(_global_expert_view, m=m, world=world) for name, m in _expert_modules(model).items()
    }


# ---------------------------------------------------------------- allocation and init


def _locate(name: str, p: Tensor, views: dict[str, Callable[[Tensor], Tensor]]) -> tuple:
    """(this rank's tensor, the whole parameter's shape, its offset there) of parameter `name`."""
    if not isinstance(p, DTensor):
        return p, None, None
    whole = views[name](p) if name in views else p  # experts: the [E, ...] view over ("dp", "ep")
    assert isinstance(whole, DTensor)
    shape, offset = compute_local_shape_and_global_offset(whole.shape, whole.device_mesh, whole.placements)
    piece = p.to_local()
    assert tuple(shape) == tuple(piece.shape), f"{name}: DTensor's local shape is the piece's"
    return piece, tuple(whole.shape), tuple(offset)


def materialize(model: nn.Module, world: World, seed: int | None = None) -> nn.Module:
    """Allocate and initialise this rank's shards of a model built on the meta device
    (after `parallelize`; in a world of one, the whole model): to_empty on world.device,
    the buffers from the config, then model.init_weights(seed, locate), which fills
    every shard with the values the whole model's init has at its positions. So every
    world size and mesh starts from the one-process weights of the same seed, and
    nothing beyond the shards is allocated but the buffers and one init block at a time
    (moge.model.init.BLOCK_NUMEL elements, or a smaller parameter whole). Returns model."""
    model.to_empty(device=world.device)
    empty = dict(model.named_buffers())  # uninitialised until init_buffers replaces them
    init_buffers(model, world.device)
    stale = [n for n, b in model.named_buffers() if b is empty.get(n)]
    if stale:
        raise RuntimeError(f"materialize: buffers {', '.join(stale)} have no init_buffers to re-create them")
    views = checkpoint_views(model, world) if world.size > 1 else {}
    model.init_weights(seed, locate=partial(_locate, views=views))  # type: ignore[operator]
    return model
