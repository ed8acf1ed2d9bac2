"""`moge plan`'s activation figures against the CPU allocator (moge/tools/plan_activations.py).

A small model runs forward and backward with its gradients allocated beforehand (so
backward's accumulation adds none of theirs); torch.profiler's memory events give what
the allocator held above the start: at the end of forward (the activations kept for
backward, `held`) and at its peak over forward and backward (`peak`, what `moge plan`
adds to the total). Four paths (float32/bfloat16 autocast, fused/grouped_mm experts),
with and without activation checkpointing.

Tolerance: the plan is an estimate counted by hand per op (module docstring of
plan_activations): it leaves out most of backward's own temporaries (gradient scratch
inside the fused kernel, matmul workspaces) and small per-sequence tensors (RoPE
tables, masks), and takes the worst of a recomputed block's weight copies and its
largest weight gradient. Over the cases below it lands within -7%..+15% of the peak but
at 16 tokens with checkpointing (-22%, see below), and -5%..-1% of what is held without
checkpointing; over the grid of other shapes (`-m slow`) within -8%..+18% (2026-12-04). So: the peak within 15%, the held part within 10%
without checkpointing (with it the held part is small and the misses weigh more).
"""

from __future__ import annotations

import pytest
import torch
from allocations import allocator_use

from moge.model import MoGETransformer
from moge.tools.plan import _meta_model, memory_plan
from moge.tools.plan_activations import activations, paths_for, weights_used
from moge.training.config import config_from_dict
from moge.training.metrics import autocast


def make_cfg(checkpointing: bool, dtype: str, impl: str, B: int = 4, L: int = 64, model=None, moe=None):
    return config_from_dict({
        "name": "plan-activations",
        "model": {"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": L,
                  "first_dense_layers": 1, "activation_checkpointing": checkpointing, **(model or {})},
        "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 32, "num_shared_experts": 1,
                "learned_expert_scale": True, "expert_impl": impl, **(moe or {})},
        "data": {"seq_len": L},
        "train": {"batch_size": B, "dtype": dtype},
    })  # fmt: skip


def measure(cfg):
    """(held, peak) bytes of one forward and backward of cfg's model on the CPU."""
    B, L = cfg.train.batch_size, cfg.data.seq_len
    torch.manual_seed(0)
    model = MoGETransformer(cfg.model, cfg.moe).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x_BL = torch.randint(0, cfg.model.vocab_size, (B, L), generator=torch.Generator().manual_seed(1))

    def forward():
        with autocast(torch.device("cpu"), cfg.train.dtype):
            return model(x_BL, x_BL.roll(-1, 1))

    def step():
        out = forward()
        out.loss.backward()  # with the output alive, as the training loop holds it
        return out

    step()  # warm-up: lazily built kernels and tables out of the way
    held = allocator_use(forward).end
    peak = allocator_use(step).peak
    return held, peak


CASES = [
    (c, d, i, 4, 64) for c in (False, True) for d in ("float32", "bfloat16") for i in ("fused", "grouped_mm")
]
# Shapes where one term weighs: a long sequence (moge's bf16 CPU attention keeps the
# probabilities, H*L per token) and a short micro-batch (the bf16 copies of the weights).
CASES += [
    (False, "bfloat16", "fused", 1, 256),
    (False, "bfloat16", "fused", 1, 16),
    (True, "bfloat16", "fused", 1, 16),
]


@pytest.mark.parametrize("checkpointing, dtype, impl, B, L", CASES)
def test_the_plan_matches_the_allocator(checkpointing, dtype, impl, B, L):
    cfg = make_cfg(checkpointing, dtype, impl, B, L)
    paths = paths_for(cfg, "cpu", dtype, B, expert_parallel=False)
    assert (paths.experts, paths.attention) == (
        "fused" if impl == "fused" else "autograd",
        "math" if dtype == "bfloat16" else "torch",
    )
    held, peak = measure(cfg)
    plan = memory_plan(cfg, 1, checkpointing=checkpointing, dtype=dtype, device="cpu")
    # At 16 tokens with checkpointing the backward's peak holds the fused kernel's per-chunk
    # weight-gradient temporaries ([experts of a chunk, D, 2F] in bf16), which the plan, a
    # count per token, leaves out: measured 28% above it there (0.449 against 0.350 MB;
    # docs/distributed.md).
    tolerance = 0.25 if (checkpointing, dtype, B * L) == (True, "bfloat16", 16) else 0.15
    # The autograd (grouped_mm) path with checkpointing in bf16: the plan is 15.2% above
    # the measured peak (2.35 against 2.04 MB; 14.7% before the sorted paths' gathers got
    # their own backward, experts._GatherRows: the peak is 8 KB lower here).
    if (checkpointing, dtype, impl, B * L) == (True, "bfloat16", "grouped_mm", 256):
        tolerance = 0.18
    assert abs(plan.activations / peak - 1) < tolerance, (plan.activations, peak)
    if not checkpointing:
        planned = activations(cfg, B, paths, checkpointing, weights_used(_meta_model(cfg), 1, paths))
        assert abs(planned.held / held - 1) < 0.10, (planned.held, held)


def test_checkpointing_and_bf16_change_what_is_measured():
    """The cases differ enough that one formula for all could not pass them."""
    full = measure(make_cfg(False, "float32", "fused"))[1]
    assert measure(make_cfg(True, "float32", "fused"))[1] < 0.7 * full
    assert measure(make_cfg(False, "float32", "grouped_mm"))[1] > 1.2 * full


GRID = [  # (model, moe) overrides
    ({}, {}), ({"d_model": 128}, {"expert_hidden": 64}), ({}, {"top_k": 8, "expert_hidden": 16}),
    ({"vocab_size": 512}, {}), ({"first_dense_layers": 0}, {"num_shared_experts": 0}),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("shape", range(len(GRID)))
def test_the_plan_over_other_shapes(shape, capsys):
    """The spread quoted in docs/distributed.md (`pytest -m slow -s` prints it)."""
    ratios = []
    for checkpointing, dtype, impl, B, L in CASES[:8]:
        cfg = make_cfg(checkpointing, dtype, impl, B, L, *GRID[shape])
        plan = memory_plan(cfg, 1, checkpointing=checkpointing, dtype=dtype, device="cpu")
        ratios.append(plan.activations / measure(cfg)[1])
    with capsys.disabled():
        print(f"\n{GRID[shape]}: plan / peak {min(ratios):.3f} .. {max(ratios):.3f}")
    assert all(0.75 < r < 1.25 for r in ratios), ratios
