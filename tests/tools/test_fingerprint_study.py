"""Smoke test of scripts/fingerprint_study.py at a very small size (4 layers, width 16, 2 steps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "fingerprint_study", ROOT / "scripts" / "fingerprint_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_runs_and_the_upcycled_copy_is_its_parent(tmp_path, capsys):
    n = torch.get_num_threads()
    out = tmp_path / "study"
    load_script().main(["--out", str(out), "--layers", "4", "--d-model", "16", "--steps", "2",
                        "--checkpoints", "2", "--permutations", "24", "--long-steps", "2"])  # fmt: skip
    torch.set_num_threads(n)
    res = json.loads((out / "study.json").read_text())
    assert sorted(res["lineage"], key=int) == ["0", "1", "2"]
    step0 = res["lineage"]["0"]
    for signal in ("q", "k", "v", "o", "qkvo"):  # the child at step 0 holds the parent's attention
        assert step0[signal]["r"] == pytest.approx(1.0)
        assert step0[signal]["p"] == pytest.approx(1 / 24)  # 4! = 24 orders, enumerated
    assert res["lineage_long"]["0"]["qkvo"]["r"] == pytest.approx(1.0)  # the constant-lr child, step 0
    assert sorted(res["lineage_long"], key=int) == ["0", "1", "2"]
    assert len(res["pairs"]) == 15 and "parent vs child" in res["pairs"]
    assert "wide24-seed4" in res["profiles"] and len(res["profiles"]["parent"]["q"]) == 4
    assert (out / "fingerprint_study.png").read_bytes()[:4] == b"\x89PNG"
    assert "| parent vs child@0 |" in (out / "study.md").read_text()
    assert "wrote" in capsys.readouterr().out
