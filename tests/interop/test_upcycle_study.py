"""Smoke test of scripts/upcycle_study.py on a very small config (a few steps per run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("upcycle_study", ROOT / "scripts" / "upcycle_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_writes_curves_table_and_an_exact_step0(tmp_path, capsys):
    raw = yaml.safe_load((ROOT / "configs" / "tiny-upcycle.yaml").read_text())
    raw["model"].update(d_model=32, dense_hidden=64, max_seq_len=32)
    raw["moe"].update(expert_hidden=16, num_shared_experts=0)  # 64 = 4 slices of 16
    raw["data"]["seq_len"] = 16
    raw["train"].update(steps=4, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1, log_every=2)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(raw))
    image, table = tmp_path / "curves.png", tmp_path / "table.md"
    n = torch.get_num_threads()
    load_script().main(
        ["--config", str(config), "--dense-steps", "3", "--out", str(tmp_path / "runs"), "--image", str(image),
         "--table", str(table)]
    )  # fmt: skip
    torch.set_num_threads(n)
    assert image.stat().st_size > 10_000 and image.read_bytes()[:4] == b"\x89PNG"
    text = table.read_text()
    assert "| 2 |" in text and "| 4 |" in text
    fig = json.loads((tmp_path / "runs" / "figures.json").read_text())
    # The upcycled run's step-0 validation loss is the dense model's final one.
    assert abs(fig["upcycled_step0_val"] - fig["dense_final_val"]) < 1e-5
    assert fig["step0_max_abs_logit_diff"] < 1e-4
    assert set(fig["upcycled_val"]) == set(fig["scratch_val"]) == {"2", "4"}
    assert "curves:" in capsys.readouterr().out
