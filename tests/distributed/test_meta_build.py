"""The 72B preset built on the meta device and parallelized for one rank of 64, in this
process: a "fake" process group (torch's testing backend: collectives do nothing)
stands in for the other 63 ranks. Nothing is allocated; the shards each rank would
materialise are exactly what `moge plan` counts.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from moge.distributed.mesh import connect
from moge.distributed.parallelize import local, parallelize
from moge.model import MoGETransformer, count_parameters
from moge.tools.plan import memory_plan
from moge.training.config import load_config

CONFIG, DEVICES, EP = "configs/pangu-pro-moe-72b.yaml", 64, 8


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG, [f"parallel.expert_parallel={EP}"])


def shards_of_rank(cfg, rank: int) -> dict:
    """Name -> (local shape, whole shape, placements) of every parameter on `rank`."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=DEVICES)
    try:
        world = connect(cfg.parallel, cfg.moe.num_groups)
        with torch.device("meta"):
            model = MoGETransformer(cfg.model, cfg.moe)
        parallelize(model, world)
        out = {}
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and local(p).is_meta, name
            out[name] = (tuple(local(p).shape), tuple(p.shape), p.placements)
        return out
    finally:
        dist.destroy_process_group()


def test_one_rank_of_64_materialises_what_the_plan_counts(cfg):
    plan = memory_plan(cfg, DEVICES, expert_parallel=EP)
    assert (plan.dp, plan.ep) == (8, 8)
    numels = {}
    for rank in (0, DEVICES - 1):
        shards = shards_of_rank(cfg, rank)
        assert all(all(isinstance(pl, Shard) for pl in placements) for _, _, placements in shards.values())
        numels[rank] = sum(torch.Size(shape).numel() for shape, _, _ in shards.values())
        largest = max(torch.Size(shape).numel() for shape, _, _ in shards.values())
        whole = max(torch.Size(shape).numel() for _, shape, _ in shards.values())
        assert largest * 50 < whole  # the biggest piece a rank allocates is a small part of one tensor
    assert numels[0] * 4 == plan.params  # rank 0, the busiest under torch.chunk's rounding
    assert numels[DEVICES - 1] <= numels[0]
    total = count_parameters(cfg.model, cfg.moe).total
    assert total / DEVICES <= numels[0] < total / DEVICES * 1.01
