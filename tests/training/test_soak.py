"""Soak: a few thousand steps of a tiny MoGE model; the group quota must never drift.

Marked slow, so the default suite (pyproject addopts: -m 'not slow') leaves it out. Run it
with `python -m pytest -m slow tests/training/test_soak.py` (about 3 minutes on 2 CPU cores).
Legend: T tokens, K experts per token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moge.balance import device_load
from moge.testing import assert_group_quota
from moge.training import train
from moge.training.checkpoint import load_run
from moge.training.config import load_config
from moge.training.data import load_dataset

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3000
# configs/tiny-moge.yaml's MoE (16 experts in 4 groups, top-4, shared expert, learned
# scales, aux loss 0.001) on a narrower, shallower model with short sequences, so
# thousands of steps fit in minutes.
OVERRIDES = [
    "model.d_model=64", "model.n_layers=2", "moe.expert_hidden=64", "data.seq_len=32",
    f"train.steps={STEPS}", "train.batch_size=4", "train.warmup_steps=50", "train.log_every=500",
    "train.eval_every=1000", "train.eval_batches=4", "train.save_every=1000", "train.threads=1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_thousands_of_steps_keep_the_group_quota_and_learn(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny-moge.yaml", [*OVERRIDES, f"train.out_dir={run}"])
    E, M, K = cfg.moe.num_experts, cfg.moe.num_groups, cfg.moe.top_k
    assert cfg.moe.router == "grouped" and (E, M, K) == (16, 4, 4)
    result = train(cfg, progress=False)
    assert result.step == STEPS

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r["step"]
        assert [layer["layer"] for layer in r["routing"]] == [0, 1], r["step"]
        for layer in r["routing"]:
            # IS = (max - min group load) / tokens: 0 means every group got T*K/M slots.
            assert layer["imbalance_score"] == 0.0, (r["step"], layer)
            assert math.isfinite(layer["max_over_mean"]) and math.isfinite(layer["lb_loss"]), (
                r["step"],
                layer,
            )

    first = sum(r["loss"] for r in steps[:100]) / 100
    last = sum(r["loss"] for r in steps[-100:]) / 100
    assert last < first - 1.5, (first, last)
    vals = [r["val_loss"] for r in records if r["type"] == "eval"]
    assert len(vals) == 3 and all(map(math.isfinite, vals)) and vals[-1] < vals[0], vals

    # The trained routers, on held-out windows: still exactly K/M experts per group per token.
    model, _, step = load_run(run)
    assert step == STEPS
    dataset = load_dataset(cfg.data)
    with torch.no_grad():
        for x_BL, _ in dataset.iter_eval_batches("val", 8, 2):
            for routed in model(x_BL).routing:
                assert_group_quota(routed.expert_ids, num_experts=E, num_groups=M, top_k=K)
                load_M = device_load(routed.expert_ids, E, M)
                assert (load_M == x_BL.numel() * K // M).all(), load_M
