"""The device mesh's configuration: the `parallel` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass

from moge._validate import check_bool, check_choice, check_int, check_optional_int

BACKENDS = ("gloo", "nccl")


@dataclass
class ParallelConfig:
    """The device mesh of `moge train` under torchrun (see docs/distributed.md).

    The world (torchrun's WORLD_SIZE) is a (dp, ep) mesh: ep = expert_parallel ranks
    share out the routed experts, dp = data_parallel such blocks FSDP-shard them further.
    """

    expert_parallel: int = 1  # ranks that share out the routed experts (mesh dim "ep")
    data_parallel: int | None = None  # mesh dim "dp"; None: WORLD_SIZE / expert_parallel
    backend: str | None = None  # gloo or nccl; None: nccl with train.device=cuda, else gloo
    static_splits: bool | None = None  # None: on for the quota routers (grouped, random)
    # FSDP2 gathers blocks in bf16 (no autocast copy kept for backward); the router, the
    # gradient reduction, the shards and AdamW stay float32. Needs train.dtype bfloat16.
    mixed_precision: bool = False  # FSDP2 bf16 blocks, float32 router and grad reduction

    def __post_init__(self) -> None:
        check_int("parallel.expert_parallel", self.expert_parallel, minimum=1)
        check_optional_int("parallel.data_parallel", self.data_parallel, minimum=1)
        if self.backend is not None:
            check_choice("parallel.backend", self.backend, BACKENDS)
        if self.static_splits is not None:
            check_bool("parallel.static_splits", self.static_splits)
        check_bool("parallel.mixed_precision", self.mixed_precision)
