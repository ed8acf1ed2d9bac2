import math

import pytest

from moge.tools.bench_sparsity import format_sparsity_report, main, run_sparsity_benchmark
from moge.training.config import config_from_dict


def _cfg(router: str):
    return config_from_dict(
        {
            "name": f"sp-{router}",
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16},
            "moe": {"num_experts": 8, "num_groups": 2, "top_k": 2, "expert_hidden": 16, "router": router,
                    "num_shared_experts": 1},
            "data": {"seq_len": 16},
            "train": {"batch_size": 2, "warmup_steps": 1, "eval_batches": 2},
        }
    )  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_equal_steps_trains_every_model_and_reports_val_loss():
    report = run_sparsity_benchmark([_cfg("grouped"), _cfg("global")], "steps", steps=3, log=lambda s: None)
    names = [r["name"] for r in report["rows"]]
    assert names[:2] == ["sp-grouped (grouped router)", "sp-global (global router)"] and "dense" in names[2]
    for r in report["rows"]:
        assert r["steps"] == 3 and r["train_s"] > 0 and math.isfinite(r["val_loss"])
        assert 3.0 < r["val_loss"] < 7.0  # near ln(256) after 3 steps
    dense = report["rows"][2]
    assert dense["params"] == dense["activated"] < report["rows"][0]["params"]
    assert "equal steps (3 each)" in format_sparsity_report(report)
    assert report["machine"]["cpu_features"] in format_sparsity_report(report)  # names the matrix flags


def test_equal_time_takes_the_steps_its_calibration_affords():
    report = run_sparsity_benchmark(
        [_cfg("grouped")], "seconds", seconds=0.5, calibrate_steps=2, log=lambda s: None
    )
    for r, t in zip(report["rows"], report["calibrated_step_s"]):
        assert r["steps"] == max(1, int(0.5 / t))
    assert "equal wall time" in format_sparsity_report(report)


def test_bad_budgets_are_refused(capsys):
    with pytest.raises(ValueError, match="budget"):
        run_sparsity_benchmark([_cfg("grouped")], "tokens")
    with pytest.raises(ValueError, match="configs"):
        run_sparsity_benchmark([])
    assert main(["configs/tiny-moge.yaml", "--steps", "2", "--seconds", "3", "--quiet"]) == 2
    assert "one budget" in capsys.readouterr().err


@pytest.mark.parametrize("budget", [["--steps", "0"], ["--seconds", "0"]])
def test_a_zero_budget_is_refused_not_replaced_by_the_default(capsys, monkeypatch, budget):
    import moge.tools.bench_sparsity as bench_sparsity

    def never(*args, **kwargs):
        raise AssertionError("trained with a budget of 0")

    monkeypatch.setattr(bench_sparsity, "train_stepper", never)
    assert main(["configs/tiny-moge.yaml", *budget, "--quiet"]) == 2
    assert "must be" in capsys.readouterr().err
