"""The world a run trains in: its shape (dp x ep), validated before any process group
exists, and the torch DeviceMesh over it.

One process is a world of size one: rank 0, no process group, no mesh, and every
collective below returns its input. Under torchrun the ranks form the mesh
("dp", "ep"), ep the inner dimension: ranks [k*ep, (k+1)*ep) share out the routed
experts, so with ep = --nproc_per_node the token all-to-alls stay inside a node.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moge.distributed.config import BACKENDS, ParallelConfig

MESH_DIMS = ("dp", "ep")


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh dimensions; dp * ep processes."""

    dp: int  # blocks of ep ranks: FSDP shards the experts over them
    ep: int  # ranks that share out the routed experts

    @property
    def world(self) -> int:
        return self.dp * self.ep


def _launch_hint(ep: int) -> str:
    return f"launch with `torchrun --standalone --nproc_per_node {ep} -m moge train CONFIG ...`"


def plan_mesh(parallel: ParallelConfig, num_groups: int, world: int) -> MeshShape:
    """The (dp, ep) shape for `world` processes; ValueError naming the field otherwise.

    Pure arithmetic: call it before creating any process group, so that a wrong
    setting is one error on every rank and not a hang in a collective.
    """
    ep, dp = parallel.expert_parallel, parallel.data_parallel
    if num_groups % ep:
        raise ValueError(
            f"parallel.expert_parallel: {ep} ranks do not divide moe.num_groups={num_groups}; "
            "every rank must hold the same number of whole groups"
        )
    if world % ep:
        raise ValueError(
            f"parallel.expert_parallel: {ep} needs a multiple of {ep} processes, got WORLD_SIZE={world}; "
            + _launch_hint(ep)
        )
    if dp is not None and dp * ep != world:
        raise ValueError(
            f"parallel.data_parallel: {dp} x parallel.expert_parallel {ep} = {dp * ep} processes, "
            f"but WORLD_SIZE={world}; leave data_parallel null to use WORLD_SIZE / expert_parallel"
        )
    return MeshShape(dp=world // ep, ep=ep)


def check_expert_shards(shape: MeshShape, d_model: int, expert_hidden: int, field: str) -> None:
    """ValueError naming `field` when dp cannot cut the experts' second axis evenly.

    With ep > 1, FSDP2 shards the experts over dp along their second axis (d_model of
    w_gate_up_EDH [J, D, 2F], expert_hidden of w_down_EFD [J, F, D]), and it cuts an
    axis other than the first only into equal parts (NotImplementedError deep inside
    fully_shard otherwise). Pure arithmetic, like plan_mesh.
    """
    if shape.ep == 1 or shape.dp == 1 or not (d_model % shape.dp or expert_hidden % shape.dp):
        return
    raise ValueError(
        f"{field}: dp={shape.dp} does not divide the experts' second axis (d_model={d_model}, "
        f"expert_hidden={expert_hidden}), which FSDP2 cuts into dp equal parts; use a dp "
        f"(processes / expert_parallel {shape.ep}) that divides both"
    )


def world_size_from_env() -> int:
    """torchrun's WORLD_SIZE (1 when unset)."""
    return env_int("WORLD_SIZE", 1)


def env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name}: environment variable not set; launch with torchrun (or set it)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


@dataclass
class World:
    """Where this process sits. mesh is None in a world of one process."""

    rank: int
    size: int
    device: torch.device
    shape: MeshShape
    mesh: DeviceMesh | None = None
    fsdp_mesh: DeviceMesh | None = None  # every rank in one dimension ("dp_ep"): FSDP over it
    owned: bool = False  # this World created the process group and destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank, in place; returns t."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t, in rank order."""
        if self.size == 1:
            return [t]
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return parts

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's t on every rank, in place; returns t."""
        if self.size > 1:
            dist.broadcast(t, 0)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def _backend(parallel: ParallelConfig, device: str) -> str:
    backend = parallel.backend or ("nccl" if device == "cuda" else "gloo")
    if backend not in BACKENDS:
        raise ValueError(f"parallel.backend: expected one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def _join(backend: str, device: str, timeout_s: float | None) -> None:
    rank, world = env_int("RANK"), env_int("WORLD_SIZE")
    if not 0 <= rank < world:
        raise ValueError(f"RANK: {rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"{name}: environment variable not set; launch with torchrun (or set it)")
    if device == "cuda":
        torch.cuda.set_device(env_int("LOCAL_RANK", rank))
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)  # None: torch's default
    dist.init_process_group(backend, init_method="env://", timeout=timeout, rank=rank, world_size=world)


def connect(parallel: ParallelConfig, num_groups: int, device: str = "cpu") -> World:
    """This process's World: joins torchrun's process group (unless one is initialised)
    and builds the ("dp", "ep") DeviceMesh. The shape is checked first."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but torch sees no CUDA device")
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    shape = plan_mesh(parallel, num_groups, world)
    if world == 1:
        return single_process(device)
    owned = not dist.is_initialized()
    if owned:
        _join(_backend(parallel, device), device, None)
    rank = dist.get_rank()
    local = env_int("LOCAL_RANK", rank)
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(dev.type, (shape.dp, shape.ep), mesh_dim_names=MESH_DIMS)
    # The replicated parameters are sharded over every rank (torchtitan's dp_shard).
    fsdp_mesh = mesh["dp", "ep"]._flatten("dp_ep")
    return World(rank, world, dev, shape, mesh, fsdp_mesh, owned)


def close(world: World, ok: bool) -> None:
    """Leave the process group if this World joined it. ok: first wait for every rank
    (gloo aborts a rank whose peer closes a connection it still reads from); after an
    error the peers may be stuck elsewhere, so no barrier then."""
    if world.owned and dist.is_initialized():
        try:
            if ok:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def single_process(device: str | torch.device = "cpu") -> World:
    """The world of one process (no process group)."""
    return World(0, 1, torch.device(device), MeshShape(dp=1, ep=1))
