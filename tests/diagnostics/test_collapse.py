"""moge.diagnostics.collapse: collapse statistics on hand-made routing, thresholds, the trainer hook."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from moge.balance import load_entropy, score_entropy
from moge.diagnostics.collapse import CollapseMonitor, Thresholds, centred_logits, logit_rms
from moge.training import train
from moge.training.config import config_from_dict


def test_load_entropy_known_values():
    assert load_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(math.log(4))
    assert load_entropy(torch.tensor([8, 0, 0, 0])) == 0.0
    assert load_entropy(torch.tensor([3, 3, 0, 0])) == pytest.approx(math.log(2))
    assert load_entropy(torch.zeros(4, dtype=torch.int64)) == 0.0


def test_logits_recovered_from_scores():
    logits = torch.tensor([[1.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    centred = logits - logits.mean(-1, keepdim=True)
    assert_close(centred_logits(logits.softmax(-1), "softmax"), centred)
    assert_close(centred_logits(logits.sigmoid(), "sigmoid"), centred)
    # RMS of [1, -1] is 1 and of [2, -2] is 2: their mean is 1.5.
    two = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    assert logit_rms(two.softmax(-1), "softmax") == pytest.approx(1.5, rel=1e-6)


def test_score_entropy_known_values():
    assert float(score_entropy(torch.full((3, 8), 1 / 8))) == pytest.approx(math.log(8))
    assert float(score_entropy(torch.eye(4))) == pytest.approx(0.0, abs=1e-12)
    # Rows renormalised (sigmoid scores); padded tokens (mask False) left out; none: 0.
    halves = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert float(score_entropy(halves * 0.3)) == pytest.approx(math.log(2) / 2)
    assert float(score_entropy(halves, torch.tensor([True, False]))) == pytest.approx(math.log(2))
    assert float(score_entropy(halves, torch.tensor([False, False]))) == 0.0
    assert score_entropy(halves.double()).dtype == torch.float64


def _routed(ids, logits):
    return SimpleNamespace(expert_ids=torch.tensor(ids), scores=torch.tensor(logits).softmax(-1))


def test_monitor_warns_on_crossing_only(capsys):
    E = 4
    limits = Thresholds(min_effective_share=0.5, max_logit_growth=5.0, max_dead_experts=0)
    monitor = CollapseMonitor([0, 3], [E, E], ["softmax", "softmax"], every=2, thresholds=limits)
    records, logged = [], []

    def step(n, ids0, ids1, scale):
        logits = [[scale, -scale, 0.0, 0.0]] * len(ids0)
        return monitor.after_step(
            n, [_routed(ids0, logits), _routed(ids1, logits)], records.append, logged.append
        )

    healthy = [[0], [1], [2], [3]]
    collapsed = [[0], [0], [0], [0]]
    assert step(1, collapsed, healthy, 1.0) is None  # not a check step
    rec = step(2, collapsed, healthy, 1.0)
    s0, s3 = rec["layers"]
    assert (s0["layer"], s0["tokens"], s0["dead_experts"], s0["effective_experts"]) == (0, 8, 3, 1.0)
    assert (s3["layer"], s3["dead_experts"]) == (3, 0) and s3["effective_experts"] == pytest.approx(4.0)
    assert s0["logit_growth"] == 1.0 and s0["logit_rms"] == pytest.approx(math.sqrt(0.5), rel=1e-6)
    p = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64).softmax(-1)
    assert s3["score_entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert len(rec["warnings"]) == 2 and all(w.startswith("layer 0:") for w in rec["warnings"])
    assert "effective experts" in rec["warnings"][0] and "3 of 4 experts" in rec["warnings"][1]
    assert logged == [f"step 2 | warning: {w}" for w in rec["warnings"]]
    # Still collapsed: no new warning; logits 10x larger in both layers: growth warnings.
    step(3, collapsed, healthy, 10.0)
    rec = step(4, collapsed, healthy, 10.0)
    assert rec["layers"][1]["logit_growth"] == pytest.approx(10.0, rel=1e-5)
    assert [w.split(":")[0] for w in rec["warnings"]] == ["layer 0", "layer 3"]
    assert all("max_logit_growth=5.0" in w for w in rec["warnings"])
    # Layer 0 recovers, then collapses again: warned again.
    step(5, healthy, healthy, 1.0)
    assert step(6, healthy, healthy, 1.0)["warnings"] == []
    step(7, collapsed, healthy, 1.0)
    assert len(step(8, collapsed, healthy, 1.0)["warnings"]) == 2
    assert [r["step"] for r in records] == [2, 4, 6, 8]


def test_monitor_off():
    monitor = CollapseMonitor([0], [4], ["softmax"], every=0)
    assert monitor.after_step(1, [_routed([[0]], [[1.0, 0, 0, 0]])], print, print) is None


def test_monitor_config_fields_validated():
    base = {
        "name": "x",
        "model": {},
        "moe": {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 8},
    }
    with pytest.raises(ValueError, match="monitor.min_effective_share: must be <= 1.0"):
        config_from_dict({**base, "monitor": {"min_effective_share": 2}})
    with pytest.raises(ValueError, match="monitor.max_dead_experts: must be >= -1"):
        config_from_dict({**base, "monitor": {"max_dead_experts": -2}})
    with pytest.raises(ValueError, match="monitor.colour: unknown key"):
        config_from_dict({**base, "monitor": {"colour": 1}})


def test_training_writes_collapse_records_and_warns(tmp_path, capsys):
    cfg = config_from_dict({
        "name": "tiny-collapse",
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16},
        "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16},
        "data": {"seq_len": 16},
        "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "log_every": 4, "eval_every": 0,
                  "eval_batches": 1, "save_every": 0, "threads": 1, "out_dir": str(tmp_path / "run")},
        # An even load over 8 experts is exp(H) = 8 exactly: share 1.0 always warns.
        "monitor": {"every": 2, "min_effective_share": 1.0, "max_logit_growth": 0, "max_dead_experts": -1},
    })  # fmt: skip
    train(cfg, progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if r["type"] == "collapse"]
    assert [r["step"] for r in recs] == [2, 4]
    assert [r["layer"] for r in recs[0]["layers"]] == [0, 1]
    assert all(r["tokens"] == 2 * 2 * 16 for r in recs[0]["layers"])  # 2 steps x 2 sequences x 16
    assert all(1.0 <= r["effective_experts"] < 8.0 for r in recs[0]["layers"])
    out = capsys.readouterr().out
    assert "step 2 | warning: layer 0: effective experts" in out
    assert len(recs[0]["warnings"]) == 2 and recs[1]["warnings"] == []  # warned at the crossing only


def test_a_resumed_run_reports_what_an_uninterrupted_one_does(tmp_path):
    """logit_growth is measured against the run's first window, not the first after a resume."""

    def cfg(name, resume=False):
        return config_from_dict({
            "name": name,
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16},
            "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16},
            "data": {"seq_len": 16},
            "train": {"steps": 6, "batch_size": 2, "warmup_steps": 1, "lr": 0.05, "log_every": 6, "eval_every": 0,
                      "eval_batches": 1, "save_every": 2, "threads": 1, "out_dir": str(tmp_path / name),
                      "resume": resume},
            # The router logits grow several-fold in 6 steps at this learning rate.
            "monitor": {"every": 2, "max_logit_growth": 3.0, "max_dead_experts": 0},
        })  # fmt: skip

    def collapse_records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["type"] == "collapse"]

    n = torch.get_num_threads()
    train(cfg("whole"), progress=False)
    train(cfg("resumed"), progress=False, stop_at=2)
    train(cfg("resumed", resume=True), progress=False)
    torch.set_num_threads(n)
    whole, resumed = collapse_records("whole"), collapse_records("resumed")
    assert [r["step"] for r in resumed] == [2, 4, 6]
    assert max(s["logit_growth"] for s in whole[-1]["layers"]) > 3.0  # the warning this test is about
    for got, want in zip(resumed, whole):
        growth = [[s["logit_growth"] for s in r["layers"]] for r in (got, want)]
        assert_close(torch.tensor(growth[0]), torch.tensor(growth[1]), rtol=1e-9, atol=0)
        assert got["warnings"] == want["warnings"], got["step"]


def test_resume_reads_only_the_records_of_this_model():
    """A sub-model cut out by moge extract carries its source's metrics: their collapse
    statistics are another router's (more experts), not this model's first window."""
    first = {"layer": 0, "tokens": 8, "load_entropy": 0.0, "effective_experts": 1.0, "score_entropy": 0.0,
             "logit_rms": 0.25, "logit_growth": 1.0, "dead_experts": 3}  # fmt: skip
    old = [{"type": "collapse", "step": 2, "layers": [first], "warnings": []}]
    limits = Thresholds(max_dead_experts=0)
    routed = [_routed([[0], [1], [2], [3]], [[1.0, -1.0, 0.0, 0.0]] * 4)]  # logit RMS sqrt(0.5)
    for records, growth in ((old, math.sqrt(0.5) / 0.25), (old + [{"type": "extract", "step": 2}], 1.0)):
        monitor = CollapseMonitor([0], [4], ["softmax"], every=1, thresholds=limits)
        monitor.resume(records)
        rec = monitor.after_step(3, routed, lambda r: None, lambda m: None)
        assert rec["layers"][0]["logit_growth"] == pytest.approx(growth, rel=1e-6)
