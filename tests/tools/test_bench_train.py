import os

import pytest
import torch

from moge.tools import bench_train
from moge.tools.bench_train import (
    BOUND_NAME,
    DENSE_NAME,
    bound_case,
    build_train_cases,
    dense_equivalent,
    format_train_report,
    main,
    qwen3_config,
    run_train_benchmark,
)
from moge.tools.dense_cost import DenseCostExperts
from moge.training.config import config_from_dict

TINY = {
    "name": "bench-tiny",
    "model": {
        "vocab_size": 256,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 16,
    },
    "moe": {
        "num_experts": 8,
        "num_groups": 2,
        "top_k": 2,
        "expert_hidden": 16,
        "num_shared_experts": 1,
        "learned_expert_scale": True,
    },
    "data": {"seq_len": 16},
    "train": {"batch_size": 2, "warmup_steps": 1},
}


def test_moge_rows_train_on_the_same_batches():
    cfg = config_from_dict(TINY)
    report = run_train_benchmark(cfg, steps=3, warmup=1, peers=False, log=lambda s: None, isolate=False)
    names = [r["name"] for r in report["rows"]]
    assert names == [
        "moge MoGETransformer (config as written)",
        DENSE_NAME,
        "moge MoGETransformer (no shared expert: Qwen3-MoE's shape)",
    ]
    full, dense, bare = report["rows"]
    # The shared expert is 3 * d * f per layer.
    assert full["params"] - bare["params"] == 2 * 3 * 32 * 16
    for r in report["rows"]:
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert 4.0 < r["lm_loss_first"] < 7.0  # near ln(256) = 5.55 at init
        assert r["aux_last"] > 0 or r["name"] == DENSE_NAME  # the dense model has no router
    assert report["tokens_per_step"] == 32
    text = format_train_report(report, "tiny")
    assert "config as written" in text and "lm loss first->last" in text
    assert report["machine"]["cpu_features"] in text  # the table names the CPU's matrix flags


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps"):
        run_train_benchmark(
            config_from_dict(TINY), steps=0, warmup=0, peers=False, log=lambda s: None, isolate=False
        )


def test_main_reports_bad_config_path(capsys):
    assert main(["does/not/exist.yaml", "--no-peers", "--quiet"]) == 2
    assert "error" in capsys.readouterr().err


def test_qwen3_peer_has_the_same_shape_and_loss_scale():
    pytest.importorskip("transformers", minversion="5")
    cfg = config_from_dict(TINY)
    qcfg = qwen3_config(cfg)
    assert (qcfg.hidden_size, qcfg.num_hidden_layers, qcfg.num_experts, qcfg.num_experts_per_tok) == (
        32,
        2,
        8,
        2,
    )
    assert qcfg.moe_intermediate_size == 16 and qcfg.head_dim == 8
    cases, notes = build_train_cases(cfg, seed=0, peers=True)
    assert not notes
    bare = next(c for c in cases if "shape" in c.name)
    for c in cases:
        if c.name.startswith("transformers"):
            # Same shape: differs only by Qwen3's q/k norms and moge's per-expert scales.
            extra_qwen = 2 * 2 * 8  # layers * (q_norm + k_norm of head_dim)
            extra_moge = 2 * 8  # layers * num_experts
            assert c.params - bare.params == extra_qwen - extra_moge
    report = run_train_benchmark(cfg, steps=2, warmup=0, peers=True, log=lambda s: None, isolate=False)
    for r in report["rows"]:
        assert 4.0 < r["lm_loss_first"] < 7.0, r
    assert "x] the tokens/s of transformers" in format_train_report(report, "tiny")


def test_moge_load_counts_reset_after_every_step():
    cfg = config_from_dict(TINY)
    case = build_train_cases(cfg, seed=0, peers=False)[0][0]
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    case.step(x, x.roll(-1, 1), lr=1e-3, grad_clip=1.0, record=True)
    assert all(int(layer.load_accum_E.sum()) == 0 for layer in case.model.moe_layers())
    assert len(case.step_ms) == 1 and len(case.lm_losses) == 1


def test_dense_equivalent_keeps_dense_blocks_only_where_their_width_is_the_activated_one():
    """One dense width for every block: a config whose own dense blocks are of another
    width would have them resized in the twin (a wrong limit), so it is refused."""
    import copy

    raw = copy.deepcopy(TINY)
    raw["model"] = {**raw["model"], "first_dense_layers": 1, "dense_hidden": 64}
    with pytest.raises(
        ValueError, match=r"^model\.first_dense_layers/moe_every: blocks \[0\] are dense of width 64"
    ):
        dense_equivalent(config_from_dict(raw))
    raw["model"]["dense_hidden"] = 2 * 16 + 16  # already the activated width: the twin is exact
    assert dense_equivalent(config_from_dict(raw)).model.dense_hidden == 48


def test_dense_equivalent_has_the_activated_width_and_bf16_runs():
    cfg = config_from_dict(TINY)
    dense = dense_equivalent(cfg)
    assert dense.model.first_dense_layers == 2 and dense.model.dense_hidden == 2 * 16 + 16  # K*f + shared
    assert dense.moe == cfg.moe
    report = run_train_benchmark(
        cfg, steps=2, warmup=0, peers=False, log=lambda s: None, dtype="bf16", isolate=False
    )
    assert report["dtype"] == "bf16"
    text = format_train_report(report, "tiny")
    assert "x] the tokens/s of the dense FFN of equal activated width" in text
    with pytest.raises(ValueError, match="dtype"):
        run_train_benchmark(
            cfg, steps=1, warmup=0, peers=False, log=lambda s: None, dtype="fp16", isolate=False
        )


@pytest.mark.parametrize("extra", [{"shared_hidden": 24}, {"shared_expert_gate": True}])
def test_the_no_shared_expert_twin_of_a_sized_or_gated_shared_expert(extra):
    cfg = config_from_dict({**TINY, "moe": {**TINY["moe"], **extra}})
    cases, _ = build_train_cases(cfg, seed=0, peers=False)
    twin = next(c for c in cases if "no shared expert" in c.name)
    assert twin.model.moe_cfg.shared_width == 0
    assert not any("shared" in name for name, _ in twin.model.named_parameters())
    # Qwen3-MoE's shape: the routed experts alone, so the count drops by the shared parts only.
    shared = sum(p.numel() for n, p in cases[0].model.named_parameters() if "shared" in n)
    assert shared > 0 and twin.params == cases[0].params - shared


def test_profile_covers_every_moge_side_model_and_prints():
    cfg = config_from_dict(TINY)
    report = run_train_benchmark(
        cfg, steps=1, warmup=0, peers=False, log=lambda s: None, profile=1, isolate=False
    )
    assert list(report["profiles"]) == [r["name"] for r in report["rows"]]
    text = format_train_report(report, "tiny")
    assert "where the time goes" in text and "routed experts" in text and "dense FFN" in text
    assert "load average" in text
    with pytest.raises(ValueError, match="profile"):
        run_train_benchmark(
            cfg, steps=1, warmup=0, peers=False, log=lambda s: None, profile=-1, isolate=False
        )


def test_compile_flag_compiles_the_moge_side_or_says_why(monkeypatch):
    import moge.tools.bench_train as bt

    seen = []
    monkeypatch.setattr(bt, "compile_model", lambda model, shape, dtype: seen.append(shape) or "no compiler")
    report = run_train_benchmark(
        config_from_dict(TINY),
        steps=1,
        warmup=0,
        peers=False,
        log=lambda s: None,
        compile=True,
        isolate=False,
    )
    assert seen == [(2, 16)] * 3
    assert all("torch.compile failed (no compiler), eager" in n for n in report["notes"])


def test_isolated_cases_train_like_one_process_and_report_failures():
    """Each case in its own process (the default) takes the same steps: the same losses
    bit for bit as all cases in this process, profiles included; a case that fails to
    build in its worker raises here with the worker's traceback."""
    cfg = config_from_dict(TINY)
    kw = dict(steps=2, warmup=1, peers=False, log=lambda s: None)
    alone = run_train_benchmark(cfg, **kw, profile=1)
    shared = run_train_benchmark(cfg, **kw, isolate=False)
    assert alone["isolated"] and not shared["isolated"]
    pids = [r["pid"] for r in alone["rows"]]  # every case trained in a process of its own
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    assert {r["pid"] for r in shared["rows"]} == {os.getpid()}
    assert [r["name"] for r in alone["rows"]] == [r["name"] for r in shared["rows"]]
    for a, b in zip(alone["rows"], shared["rows"]):
        for key in ("params", "lm_loss_first", "lm_loss_last", "aux_first", "aux_last"):
            assert a[key] == b[key], (a["name"], key)
    assert list(alone["profiles"]) == [r["name"] for r in alone["rows"]]
    assert "a process of its own" in format_train_report(alone, "tiny")
    from moge.tools.bench_isolated import RemoteCase

    bad = RemoteCase(
        "moge.tools.bench_train:build_case", {"kind": "moge", "config": {"model": {}}, "arg": "x"}
    )
    try:  # fails in the child: the config lacks its required fields
        with pytest.raises(RuntimeError, match="(?s)failed:.*ValueError"):
            bad.wait_ready()
    finally:
        bad.close()


def test_row_quartiles_lie_within_the_measured_steps():
    summary = {"name": "m", "params": 1, "step_ms": [10.0, 20.0], "lm_losses": [5.0, 4.0],
               "aux_losses": [0.1, 0.1], "pid": 1}  # fmt: skip
    row = bench_train._row(summary, tokens=100)
    assert (row["q1_ms"], row["median_ms"], row["q3_ms"]) == (12.5, 15.0, 17.5)
    assert row["tokens_per_s"] == pytest.approx(100 / 0.015)


class _FakeCase:
    """Records its calls into a shared event list (TrainCase's interface, no model)."""

    def __init__(self, name: str, events: list) -> None:
        self.name, self.events, self.ms = name, events, []

    def set_autocast(self, dtype) -> None:
        pass

    def step(self, x_BL, y_BL, lr, grad_clip, record) -> None:
        self.events.append(("step", self.name))
        if record:
            self.ms.append(1.0)

    def profile_step(self, x_BL, y_BL, lr, grad_clip) -> dict:
        self.events.append(("profile", self.name))
        return {"ms": {}, "steps": 1}

    def summary(self) -> dict:
        n = len(self.ms)
        return {"name": self.name, "params": 1, "step_ms": self.ms, "lm_losses": [1.0] * n,
                "aux_losses": [0.0] * n, "pid": 1}  # fmt: skip


@pytest.mark.parametrize("isolate, threads", [(True, 2), (True, 1), (False, 2)])
def test_turns_between_processes_of_several_threads_wait_for_openmp_to_settle(monkeypatch, isolate, threads):
    """Isolated cases with 2+ torch threads: a pause of SETTLE_S before every turn (the last
    process's OpenMP helpers spin on for a while); one thread, or one process: none."""
    events: list = []
    monkeypatch.setattr(bench_train.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(bench_train, "merge_profiles", lambda runs: {})
    cfg = config_from_dict(TINY)
    cases = [_FakeCase("a", events), _FakeCase("b", events)]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        report = bench_train._run_cases(
            cases, ["moge a", "moge b"], cfg, bench_train.load_dataset(cfg.data), 2, 1, 0, lambda s: None,
            "fp32", 1, False, bench_train.machine_info(), [], isolate,
        )  # fmt: skip
    finally:
        torch.set_num_threads(saved)
    pause_line = f"{1e3 * bench_train.SETTLE_S:.0f} ms pause before each turn"
    said = pause_line in format_train_report({**report, "profiles": {}}, "t")
    assert said == (isolate and threads > 1)
    turns = [e for e in events if e[0] in ("step", "profile")]
    assert len(turns) == 2 * 3 + 2  # (warmup + steps) rounds and one profiled round, two cases each
    pauses = [s for kind, s in events if kind == "sleep"]
    if isolate and threads > 1:
        assert pauses == [bench_train.SETTLE_S] * len(turns)
        assert all(
            events[i - 1] == ("sleep", bench_train.SETTLE_S) for i, e in enumerate(events) if e in turns
        )
    else:
        assert pauses == []


@pytest.mark.parametrize("tool", ["bench_train", "bench_sparsity", "bench_generate"])
def test_default_configs_are_presets_found_from_any_folder(tool, tmp_path, monkeypatch):
    """A benchmark run without configs, from outside the checkout, finds its default ones."""
    import importlib

    from moge.training.config import load_config

    args = importlib.import_module(f"moge.tools.{tool}").build_parser().parse_args([])
    defaults = args.configs if tool != "bench_generate" else [args.config]
    monkeypatch.chdir(tmp_path)
    for name in defaults:
        assert load_config(name).name == name


def test_the_bound_case_trains_every_parameter_of_the_moge_model():
    cfg = config_from_dict(TINY)
    case = bound_case(cfg, BOUND_NAME, seed=0)
    layers = list(case.model.moe_layers())
    assert len(layers) == 2 and all(isinstance(layer.experts, DenseCostExperts) for layer in layers)
    in_optimizer = {id(p) for g in case.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in case.model.parameters()}
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    lm, aux = case.loss_fn(x, x.roll(-1, 1))
    (lm + aux).backward()
    # Every parameter gets a gradient, as in moge (the replaced experts' are zeros).
    assert [n for n, p in case.model.named_parameters() if p.grad is None] == []
    case.optimizer.zero_grad(set_to_none=True)
    case.step(x, x.roll(-1, 1), lr=1e-3, grad_clip=1.0, record=True)
    assert len(case.step_ms) == 1 and 4.0 < case.lm_losses[0] < 7.0


def test_bench_train_reports_the_bound_against_the_dense_model():
    cfg = config_from_dict(TINY)
    names = [c.name for c in build_train_cases(cfg, seed=0, peers=False, bound=True)[0]]
    assert names[:3] == ["moge MoGETransformer (config as written)", DENSE_NAME, BOUND_NAME]
    assert BOUND_NAME not in [c.name for c in build_train_cases(cfg, seed=0, peers=False)[0]]
    report = run_train_benchmark(
        cfg, steps=2, warmup=0, peers=False, log=lambda s: None, isolate=False, bound=True
    )
    text = format_train_report(report, "tiny")
    assert f"{BOUND_NAME}: " in text and "the tokens/s of the dense FFN of equal activated width" in text
