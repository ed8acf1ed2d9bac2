"""Tests of moge/tools/plan.py and `moge plan`: the figures against real tensors.

One process here; the 2- and 4-rank figures are checked against the sharded tensors of
real runs in tests/distributed/test_distributed_train.py (test_the_memory_plan_matches_the_shards).
"""

from __future__ import annotations

import pytest
import torch

from moge.cli import main
from moge.tools.plan import USABLE, memory_plan
from moge.training import build_optimizer
from moge.training.config import config_from_dict, load_config

RAW = {
    "name": "plan-test",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32,
              "first_dense_layers": 1},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16, "num_shared_experts": 1,
            "learned_expert_scale": True},
    "data": {"seq_len": 32},
    "train": {"batch_size": 2},
}  # fmt: skip


def measured_bytes(model, opt) -> dict:
    """Bytes of the parameters, their gradients and the AdamW state, from the tensors themselves."""

    def nbytes(t):
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    return {
        "params": sum(nbytes(p) for p in model.parameters()),
        "grads": sum(nbytes(p.grad) for p in model.parameters()),
        "optimizer": sum(nbytes(v) for s in opt.state.values() for v in s.values()),
    }


def test_one_process_figures_are_the_real_tensors_bytes():
    from moge.model import MoGETransformer

    cfg = config_from_dict(RAW)
    torch.manual_seed(0)
    model = MoGETransformer(cfg.model, cfg.moe)
    opt = build_optimizer(model, cfg.train)
    x_BL = torch.randint(0, 256, (2, 32))
    model(x_BL, x_BL.roll(-1, 1)).loss.backward()
    opt.step()
    plan = memory_plan(cfg, 1)
    got = measured_bytes(model, opt)
    assert got == {"params": plan.params, "grads": plan.grads, "optimizer": plan.optimizer}
    assert plan.fsdp_buffers == 0 and plan.activations > 0


def test_sharding_divides_the_state_and_checkpointing_the_activations():
    cfg = load_config("configs/tiny-moge.yaml")
    one, four = memory_plan(cfg, 1), memory_plan(cfg, 4, expert_parallel=2)
    assert (four.dp, four.ep) == (2, 2)
    assert one.params / 4 <= four.params < one.params / 4 * 1.1  # rounding up by rows only
    on = memory_plan(cfg, 4, expert_parallel=2, checkpointing=True)
    assert on.activations < four.activations and on.params == four.params
    assert memory_plan(cfg, 4, device_gb=1e-6).fits is False and four.fits
    assert 0 < USABLE < 1


def test_the_72b_preset_on_64_devices_fits_80_gb_with_checkpointing():
    cfg = load_config("configs/pangu-pro-moe-72b.yaml")
    p = memory_plan(cfg, 64, expert_parallel=8, micro_batch=1, checkpointing=True)
    total_params = 4 * sum(  # fp32 bytes of the whole model, from the meta model
        t.numel()
        for t in __import__("moge.tools.plan", fromlist=["_meta_model"])._meta_model(cfg).parameters()
    )
    assert total_params / 64 <= p.params < total_params / 64 * 1.05
    assert p.fits and not memory_plan(cfg, 8, expert_parallel=8, micro_batch=1, checkpointing=True).fits


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--devices", "3", "--mesh", "ep=3"], "--mesh: ep=3 does not divide moe.num_groups=4"),
        (["--devices", "3", "--mesh", "dp=2"], "--mesh: dp=2 does not divide --devices 3"),
        (["--devices", "4", "--mesh", "dp=3,ep=2"], "--mesh: dp=3 x ep=2 = 6 devices, but --devices 4"),
        (["--devices", "4", "--mesh", "tp=2"], "--mesh: expected dp=D,ep=E or ep=E"),
        (["--devices", "3", "--mesh", "ep=2"], "--mesh: ep=2 does not divide --devices 3"),
        (["--devices", "1", "--mesh", "ep=2"], "--mesh: ep=2 does not divide --devices 1"),
        (["--devices", "2", "--mesh", "ep=0"], "--mesh: sizes must be >= 1"),
        # dp 3 x ep 2: FSDP2 cannot cut the experts' 128 columns into 3 equal parts (moge train refuses it)
        (["--devices", "6", "--mesh", "ep=2"], "--devices: dp=3 does not divide the experts' second axis"),
        (["--devices", "2", "--device-gb", "0"], "--device-gb: must be a positive number of GiB, got 0.0"),
        (
            ["--devices", "2", "--device-gb", "-80"],
            "--device-gb: must be a positive number of GiB, got -80.0",
        ),
        (["--devices", "2", "--device-gb", "nan"], "--device-gb: must be a positive number of GiB, got nan"),
        (["--devices", "2", "--device-gb", "inf"], "--device-gb: must be a positive number of GiB, got inf"),
        # dp alone: the ep left over (8 / 1) must divide the groups too, and the error names --mesh
        (
            ["--devices", "8", "--mesh", "dp=1"],
            "--mesh: dp=1 leaves ep=8 of --devices 8, which does not divide moe.num_groups=4",
        ),
    ],
)
def test_bad_meshes_are_one_error_line(capsys, argv, fragment):
    assert main(["plan", "configs/tiny-moge.yaml", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


def test_plan_prints_a_column_per_device_count(capsys):
    assert main(["plan", "configs/tiny-moge.yaml", "--devices", "1", "2", "4", "--mesh", "ep=2"]) == 2
    assert "ep=2" not in capsys.readouterr().out  # 1 device cannot hold ep=2
    assert main(["plan", "configs/tiny-moge.yaml", "--devices", "2", "4", "--mesh", "ep=2"]) == 0
    out = capsys.readouterr().out
    assert "2 (1 x 2)" in out and "4 (2 x 2)" in out and "AdamW state" in out
    assert main(["plan", "configs/tiny-moge.yaml", "--devices", "4", "8", "--mesh", "dp=2"]) == 0
    out = capsys.readouterr().out  # dp alone: ep is the rest of the devices
    assert "4 (2 x 2)" in out and "8 (2 x 4)" in out


def test_mixed_precision_drops_the_weight_copies_and_shrinks_the_gathered_blocks():
    raw = {**RAW, "train": {"batch_size": 2, "dtype": "bfloat16"}}
    auto = config_from_dict(raw)
    mixed = config_from_dict({**raw, "parallel": {"mixed_precision": True}})
    from moge.tools.plan import _meta_model
    from moge.tools.plan_activations import paths_for, weights_used

    paths = paths_for(auto, "cuda", "bfloat16", 2, expert_parallel=True)
    copies = 2 * sum(weights_used(_meta_model(auto), 2, paths).casts)  # what autocast keeps, bf16
    a, m = memory_plan(auto, 2, expert_parallel=2), memory_plan(mixed, 2, expert_parallel=2)
    assert copies > 0 and not a.mixed_precision and m.mixed_precision
    assert a.activations - m.activations == copies
    assert (a.params, a.grads, a.optimizer) == (m.params, m.grads, m.optimizer)  # the shards stay float32
    # 12 bytes an element (two float32 blocks, one float32 gradient) -> 10 (two bf16
    # blocks, a bf16 gradient and its float32 copy); the router stays float32.
    assert 10 / 12 <= m.fsdp_buffers / a.fsdp_buffers < 10 / 12 + 0.02
    one = memory_plan(mixed, 1)  # one process: no FSDP2, autocast alone
    assert not one.mixed_precision and one == memory_plan(auto, 1)
    with pytest.raises(ValueError, match=r"^--dtype: parallel\.mixed_precision runs the blocks in bfloat16"):
        memory_plan(mixed, 2, dtype="float32")
