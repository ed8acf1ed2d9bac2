"""A run's recorded routing replayed by the simulator: `moge eval` writes it, `moge simulate --trace` reads it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moge.cli import main
from moge.tools.simulate import simulate, trace_ids
from moge.training import train
from moge.training.config import config_from_dict, save_config

E, M, K, SEQ = 8, 4, 4, 16


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    cfg = config_from_dict({
        "name": "trace-run",
        "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": SEQ},
        "moe": {"num_experts": E, "num_groups": M, "top_k": K, "expert_hidden": 8},
        "data": {"seq_len": SEQ},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 2, "eval_every": 0,
                  "eval_batches": 1, "save_every": 0, "threads": 1, "out_dir": str(root / "run")},
        "eval": {"batches": 4, "batch_size": 2, "plots": False},
    })  # fmt: skip
    train(cfg, progress=False)
    assert main(["eval", str(root / "run")]) == 0
    return root / "run", cfg


def test_replayed_ids_are_the_recorded_ones(evaluated_run):
    run, cfg = evaluated_run
    recorded = load_file(str(run / "routing_trace.safetensors"))
    ids = trace_ids(run, cfg, tokens=32, trials=100)  # a run folder is accepted too
    # 4 eval batches x 2 x 16 = 128 tokens per layer -> 4 windows of 32, layer 0 then layer 1 each.
    assert ids.shape == (8, 32, K)
    assert torch.equal(ids[0], recorded["layer_0"][:32]) and torch.equal(ids[1], recorded["layer_1"][:32])
    assert torch.equal(ids[7], recorded["layer_1"][96:])


def test_recorded_moge_routing_is_balanced_on_one_group_per_device(evaluated_run):
    run, cfg = evaluated_run
    on_groups = simulate(cfg, M, 32, "trace", trace=run / "routing_trace.safetensors")
    assert on_groups.imbalance_mean == 0.0 and on_groups.imbalance_max == 0.0  # MoGE: IS = 0 always
    on_pairs = simulate(cfg, E, 32, "trace", trace=run)  # 2 devices per group: no such guarantee
    assert on_pairs.placement == "recorded ids"


def test_simulate_cli_replays_an_eval_trace(evaluated_run, tmp_path, capsys):
    run, cfg = evaluated_run
    save_config(cfg, tmp_path / "cfg.yaml")
    code = main(["simulate", str(tmp_path / "cfg.yaml"), "--devices", str(M), "--tokens", "32",
                 "--routers", "grouped", "--trace", str(run), "--out", str(tmp_path / "sim")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "trace" in out and "recorded ids" in out
    rows = json.loads((tmp_path / "sim" / "simulation.json").read_text())["results"]
    assert [r["router"] for r in rows] == ["grouped", "trace"]
    assert rows[1]["imbalance_mean"] == 0.0
