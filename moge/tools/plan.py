"""Memory plan: the bytes one device holds when `moge train` runs a config on N devices.

Legend: N devices as a (dp, ep) mesh, E experts, J = E/ep experts per device, B micro-batch
(sequences per device), L data.seq_len, T = B*L tokens per device, D d_model, K top_k,
F expert hidden, S shared hidden, V vocabulary, H/G query/KV heads, C head dim.

Parameters, gradients and AdamW state follow the plan of moge.distributed.parallelize
exactly (fp32, rank 0, the busiest under torch.chunk's rounding): replicated tensors
are FSDP2-sharded over all N devices on their first axis, routed experts cut to J by
ep and their second axis FSDP2-sharded over dp; they are what moge.distributed.
parallelize.materialize allocates on a rank. FSDP2's all-gather buffers hold one
block unsharded (two with prefetch) and its unsharded gradient (in bf16, with a float32
copy for the reduce-scatter, under parallel.mixed_precision, which also keeps no bf16
copy of the block weights for backward). Activations are an
estimate counted per op for the device's kernels (moge.tools.plan_activations).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from moge.distributed.config import ParallelConfig
from moge.distributed.expert_parallel import EXPERT_KEYS
from moge.distributed.mesh import MeshShape, check_expert_shards, plan_mesh
from moge.model import MoGETransformer
from moge.tools.plan_activations import Paths, Weights, activations, paths_for, weights_used
from moge.training.config import RunConfig

USABLE = 0.9  # share of a device's memory a plan may fill (allocator, CUDA context, fragmentation)
GIB = 1 << 30


@dataclass
class MemoryPlan:
    """Bytes on one device (rank 0). `fits`: total <= USABLE * device_bytes."""

    devices: int
    dp: int
    ep: int
    micro_batch: int
    dtype: str
    checkpointing: bool
    mixed_precision: bool  # parallel.mixed_precision on several devices: no bf16 weight copies kept
    params: int
    grads: int
    optimizer: int
    fsdp_buffers: int
    activations: int
    device_bytes: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.fsdp_buffers + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= USABLE * self.device_bytes


def _chunk(size: int, parts: int) -> int:
    """Rows rank 0 holds when torch.chunk cuts `size` rows into `parts`."""
    return min(size, math.ceil(size / parts))


def local_numel(name: str, shape: tuple[int, ...], mesh: MeshShape) -> int:
    """Elements rank 0 holds of the parameter `name` of the whole-model shape `shape`."""
    if mesh.world == 1 or not shape:
        return math.prod(shape)
    if name.endswith(EXPERT_KEYS):
        rows, cols, rest = shape[0] // mesh.ep, _chunk(shape[1], mesh.dp), math.prod(shape[2:])
        return rows * cols * rest
    return _chunk(shape[0], mesh.world) * math.prod(shape[1:])


def _meta_model(cfg: RunConfig) -> MoGETransformer:
    with torch.device("meta"):
        return MoGETransformer(cfg.model, cfg.moe)


def _fsdp_buffers(model: MoGETransformer, mesh: MeshShape, mixed_precision: bool) -> int:
    """Two blocks' parameters all-gathered (one prefetched) and one block's unsharded
    grads: float32, or with mixed precision bf16 parameters (the router's float32) and
    bf16 gradients plus their float32 copy for the reduce-scatter."""
    if mesh.world == 1:
        return 0
    unit = 0
    for block in model.blocks:
        size = 0
        for name, p in block.named_parameters():
            numel = p.numel() // mesh.ep if name.endswith(EXPERT_KEYS) else p.numel()
            low = mixed_precision and not name.endswith("router.weight")
            size += numel * ((2 * 2 + 2 + 4) if low else 3 * 4)
        unit = max(unit, size)
    return unit


def weights_kept(model: MoGETransformer, ep: int, paths: Paths, mixed_precision: bool) -> Weights:
    """plan_activations.weights_used, less the bf16 weight copies autocast keeps for
    backward where parallel.mixed_precision runs (FSDP2 frees its bf16 unsharded
    parameters after each block instead)."""
    weights = weights_used(model, ep, paths)
    return dataclasses.replace(weights, casts=[0] * len(weights.casts)) if mixed_precision else weights


def memory_plan(
    cfg: RunConfig,
    devices: int,
    *,
    expert_parallel: int | None = None,
    micro_batch: int | None = None,
    dtype: str | None = None,
    checkpointing: bool = False,
    device_gb: float = 80.0,
    device: str = "cuda",
) -> MemoryPlan:
    """The MemoryPlan of `cfg` on `devices` devices (validated like `moge train` under torchrun).

    expert_parallel None: parallel.expert_parallel of the config; micro_batch None:
    train.batch_size; dtype None: train.dtype (of the activations; weights are fp32);
    device: "cuda" or "cpu", whose kernels the activations follow (plan_activations).
    """
    ep = cfg.parallel.expert_parallel if expert_parallel is None else expert_parallel
    if devices < 1:
        raise ValueError(f"--devices: must be >= 1, got {devices}")
    if not 0 < device_gb < math.inf:
        raise ValueError(f"--device-gb: must be a positive number of GiB, got {device_gb!r}")
    mesh = plan_mesh(ParallelConfig(expert_parallel=ep), cfg.moe.num_groups, devices)
    check_expert_shards(mesh, cfg.model.d_model, cfg.moe.expert_hidden, "--devices")  # as parallelize
    model = _meta_model(cfg)
    numels = [local_numel(n, tuple(p.shape), mesh) for n, p in model.named_parameters()]
    params = 4 * sum(numels)
    optimizer = 2 * params + 4 * len(numels)  # exp_avg, exp_avg_sq; one fp32 step per tensor
    micro = cfg.train.batch_size if micro_batch is None else micro_batch
    act_dtype = cfg.train.dtype if dtype is None else dtype
    if cfg.parallel.mixed_precision and act_dtype != "bfloat16":
        raise ValueError(f"--dtype: parallel.mixed_precision runs the blocks in bfloat16, not {act_dtype}")
    mixed = cfg.parallel.mixed_precision and mesh.world > 1  # one process: autocast alone
    paths = paths_for(cfg, device, act_dtype, micro, mesh.ep > 1)
    acts = activations(cfg, micro, paths, checkpointing, weights_kept(model, mesh.ep, paths, mixed))
    return MemoryPlan(
        devices=devices, dp=mesh.dp, ep=mesh.ep, micro_batch=micro, dtype=act_dtype,
        checkpointing=checkpointing, mixed_precision=mixed, params=params, grads=params, optimizer=optimizer,
        fsdp_buffers=_fsdp_buffers(model, mesh, mixed), activations=acts.peak,
        device_bytes=int(device_gb * GIB),
    )  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(cfg: RunConfig, plans: list[MemoryPlan]) -> str:
    """A table: one column per plan, one row per kind of memory."""
    head = f"{cfg.name}: per-device memory (rank 0), fp32 weights + AdamW, activations in the given dtype"
    if cfg.parallel.mixed_precision:
        head += "; FSDP2 mixed precision (bf16 blocks) on more than one device"
    rows = [
        ("devices (dp x ep)", lambda p: f"{p.devices} ({p.dp} x {p.ep})"),
        ("micro-batch, act. ckpt", lambda p: f"{p.micro_batch}, {'on' if p.checkpointing else 'off'}"),
        ("parameters", lambda p: _gib(p.params)),
        ("gradients", lambda p: _gib(p.grads)),
        ("AdamW state", lambda p: _gib(p.optimizer)),
        ("FSDP2 buffers", lambda p: _gib(p.fsdp_buffers)),
        (f"activations (~, {plans[0].dtype})", lambda p: _gib(p.activations)),
        ("total", lambda p: _gib(p.total)),
        (
            f"fits {plans[0].device_bytes / GIB:.0f} GiB (90%)",
            lambda p: "yes" if p.fits else "NO",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [head]
    for label, fn in rows:
        lines.append(f"{label:<{width}} | " + " | ".join(f"{fn(p):>16}" for p in plans))
    return "\n".join(lines)
