"""Tests of moge/distributed/mesh.py: the mesh shape is validated before any process group."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from moge.distributed.config import ParallelConfig
from moge.distributed.mesh import MeshShape, connect, plan_mesh


@pytest.mark.parametrize(
    "ep, dp, world, groups, expected",
    [(2, None, 4, 4, MeshShape(2, 2)), (2, 2, 4, 4, MeshShape(2, 2)), (4, None, 4, 8, MeshShape(1, 4)),
     (1, None, 1, 4, MeshShape(1, 1)), (1, 3, 3, 4, MeshShape(3, 1))],
)  # fmt: skip
def test_shapes_that_fit(ep, dp, world, groups, expected):
    assert plan_mesh(ParallelConfig(expert_parallel=ep, data_parallel=dp), groups, world) == expected
    assert expected.world == world


@pytest.mark.parametrize(
    "ep, dp, world, groups, fragment",
    [
        (2, 3, 4, 4, r"^parallel\.data_parallel: 3 x parallel\.expert_parallel 2 = 6 processes, but WORLD_SIZE=4"),
        (2, None, 3, 4, r"^parallel\.expert_parallel: 2 needs a multiple of 2 processes, got WORLD_SIZE=3"),
        (3, None, 3, 4, r"^parallel\.expert_parallel: 3 ranks do not divide moe\.num_groups=4"),
    ],
)  # fmt: skip
def test_a_wrong_shape_is_one_error_naming_the_field(ep, dp, world, groups, fragment):
    with pytest.raises(ValueError, match=fragment):
        plan_mesh(ParallelConfig(expert_parallel=ep, data_parallel=dp), groups, world)


def test_connect_checks_the_shape_before_joining_a_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match=r"^parallel\.data_parallel: 3"):
        connect(ParallelConfig(expert_parallel=2, data_parallel=3), 4)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    world = connect(ParallelConfig(), 4)
    assert (world.size, world.rank, world.mesh) == (1, 0, None) and not dist.is_initialized()
