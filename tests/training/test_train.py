"""Tests of moge/training (one process): schedule, optimiser groups, run directory, exact resume, NaN stop."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.testing import assert_close

from moge.model import MoGETransformer
from moge.training import NonFiniteLossError, build_optimizer, lr_at, train
from moge.training.checkpoint import find_checkpoint, load_run, read_tensors
from moge.training.config import MonitorConfig, TrainConfig, config_from_dict, load_config

DEEPSEEK_MOE = {"router": "group_limited", "topk_groups": 2, "score_func": "sigmoid", "normalize_weights": True,
                "bias_update_rate": 0.01, "aux_loss_coef": 0.0}  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads():
    # train.threads=1 below: 2 threads on a busy 2-core machine are many times slower.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_cfg(out_dir, steps: int = 8, moe: dict | None = None, **train_kw):
    raw = {
        "name": "tiny-test",
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32},
        "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16, "num_shared_experts": 1,
                "learned_expert_scale": True, "aux_loss_coef": 0.01, **(moe or {})},
        "data": {"seq_len": 32},
        "train": {"steps": steps, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "log_every": 4, "eval_every": 0, "eval_batches": 2, "save_every": 0, "keep_last": 2,
                  "threads": 1, "out_dir": str(out_dir), **train_kw},
    }  # fmt: skip
    return config_from_dict(raw)


def records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def final_tensors(run_dir) -> dict:
    """Model, AdamW state and RNG of the newest checkpoint."""
    return read_tensors(run_dir)


# --- schedule and optimiser ------------------------------------------------------


def test_lr_warmup_then_cosine_to_min_lr():
    tc = TrainConfig(steps=12, lr=1.0, min_lr=0.1, warmup_steps=2)
    lrs = [lr_at(s, tc) for s in range(12)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])), "cosine decays monotonically"
    assert math.isclose(lrs[-1], 0.1)
    assert math.isclose(lrs[7], 0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 9)))
    assert lr_at(0, TrainConfig(steps=3, warmup_steps=0, lr=1.0, min_lr=0.0)) == 1.0


def test_weight_decay_only_on_matrices(tmp_path):
    cfg = make_cfg(tmp_path)
    model = MoGETransformer(cfg.model, cfg.moe)
    decay, no_decay = build_optimizer(model, cfg.train).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == cfg.train.weight_decay > 0 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.ffn.expert_scale_E" in no_decay_names and "norm.weight" in no_decay_names
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


# --- a run and its directory ------------------------------------------------------


def test_loss_decreases_and_run_dir_is_complete(tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(run, steps=30, eval_every=15, save_every=10)
    result = train(cfg, progress=False)
    assert result.step == 30 and result.out_dir == run
    train_recs = records(run, "train")
    assert [r["step"] for r in train_recs] == list(range(1, 31))
    first, last = [r["loss"] for r in train_recs[:5]], [r["loss"] for r in train_recs[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, (first, last)
    rec = train_recs[-1]
    for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"):
        assert isinstance(rec[key], float) and math.isfinite(rec[key]), key
    assert math.isclose(rec["loss"], rec["lm_loss"] + rec["aux_loss"], rel_tol=1e-5)
    assert [r["layer"] for r in rec["routing"]] == [0, 1]
    for key in (
        "imbalance_score",
        "max_over_mean",
        "load_entropy",
        "score_entropy",
        "cv",
        "lb_loss",
        "z_loss",
    ):
        assert isinstance(rec["routing"][0][key], float), key
    assert rec["routing"][0]["imbalance_score"] == 0.0, "the grouped router is balanced across groups"
    assert isinstance(rec["routing"][0]["dead_experts"], int)
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["val_loss"] == result.val_loss
    assert result.val_loss < 5.0 and result.train_loss == rec["loss"]
    assert load_config(run / "config.yaml") == cfg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "LATEST",
        "step_00000020",
        "step_00000030",
    ]
    model, _, step = load_run(run)
    assert step == 30 and not model.training


def test_same_seed_same_loss_curve(tmp_path):
    losses = []
    for name in ("a", "b"):
        train(make_cfg(tmp_path / name, steps=6), progress=False)
        losses.append([(r["loss"], r["grad_norm"]) for r in records(tmp_path / name, "train")])
    assert losses[0] == losses[1]
    train(make_cfg(tmp_path / "c", steps=6, seed=5), progress=False)
    assert [r["loss"] for r in records(tmp_path / "c", "train")] != [x[0] for x in losses[0]]


@pytest.mark.parametrize("variant", ["grouped", "deepseek_accum2"])
def test_resume_reaches_the_same_weights(tmp_path, variant):
    moe, kw = (DEEPSEEK_MOE, {"grad_accum": 2}) if variant == "deepseek_accum2" else (None, {})
    train(make_cfg(tmp_path / "full", steps=8, moe=moe, **kw), progress=False)
    stopped = make_cfg(tmp_path / "split", steps=8, moe=moe, **kw)
    assert train(stopped, progress=False, stop_at=3).step == 3
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # a killed run may log past its checkpoint
        f.write(json.dumps({"type": "train", "step": 4, "loss": 0.0}) + "\n" + '{"type": "tra')
    resumed = make_cfg(tmp_path / "split", steps=8, moe=moe, resume=True, **kw)
    assert train(resumed, progress=False).step == 8
    full, split = final_tensors(tmp_path / "full"), final_tensors(tmp_path / "split")
    assert_close(split, full, rtol=0, atol=0)
    if variant == "deepseek_accum2":
        assert full["model.blocks.1.ffn.balance_bias_E"].abs().sum() > 0, "the bias must have moved"
    steps_logged = [r["step"] for r in records(tmp_path / "split", "train")]
    assert steps_logged == list(range(1, 9))
    assert [r["loss"] for r in records(tmp_path / "split", "train")] == [
        r["loss"] for r in records(tmp_path / "full", "train")
    ]


@pytest.mark.parametrize("section, key, value", [("model", "activation_checkpointing", True),
                                                  ("moe", "expert_impl", "loop"),
                                                  ("moe", "router_dtype", "input")])  # fmt: skip
def test_resume_may_change_how_the_model_is_computed(tmp_path, section, key, value):
    # None changes a weight, yet a resume refused them as "differs from the checkpoint ...;
    # use another train.out_dir" (which cannot continue the run): no way to turn recompute
    # on after running out of memory, nor to train a converted checkpoint (router_dtype
    # input) with float32 logits as docs/moe-traps.md says to.
    train(make_cfg(tmp_path / "full", steps=4), progress=False)
    assert train(make_cfg(tmp_path / "split", steps=4), progress=False, stop_at=2).step == 2
    resumed = make_cfg(tmp_path / "split", steps=4, resume=True)
    resumed = dataclasses.replace(
        resumed, **{section: dataclasses.replace(getattr(resumed, section), **{key: value})}
    )
    assert train(resumed, progress=False).step == 4
    exact = dict(rtol=0, atol=0) if key == "activation_checkpointing" else dict(rtol=1e-4, atol=1e-5)
    assert_close(final_tensors(tmp_path / "split"), final_tensors(tmp_path / "full"), **exact)
    with pytest.raises(ValueError, match=r"^model\.n_layers: differs from the checkpoint"):
        other = make_cfg(tmp_path / "split", steps=6, resume=True)
        train(dataclasses.replace(other, model=dataclasses.replace(other.model, n_layers=3)), progress=False)


def test_a_weights_only_run_folder_trains_with_a_fresh_optimizer(tmp_path):
    # `moge convert --to moge` and save_pretrained(layout="moge") write a step-0 checkpoint
    # without optimizer state; resuming it failed: "state.json: param_groups must be a JSON
    # list ...", so a converted checkpoint could not be trained at all.
    train(make_cfg(tmp_path / "fresh", steps=3), progress=False)
    cfg = make_cfg(tmp_path / "weights", steps=3, resume=True)
    torch.manual_seed(cfg.train.seed)  # the init of a fresh run (the seed's first draw)
    MoGETransformer(cfg.model, cfg.moe).save_pretrained(tmp_path / "weights", layout="moge")
    assert train(cfg, progress=False).step == 3
    assert [r["loss"] for r in records(tmp_path / "weights", "train")] == [
        r["loss"] for r in records(tmp_path / "fresh", "train")
    ]
    got, want = final_tensors(tmp_path / "weights"), final_tensors(tmp_path / "fresh")
    for state in (got, want):  # torch's RNG as the writer left it (no step draws from it)
        del state["rng.torch_cpu"]
    assert_close(got, want, rtol=0, atol=0)


def test_resume_keeps_the_collapse_monitors_baseline_and_warnings(tmp_path):
    # The monitor's first window (logit_growth's baseline) and the warnings in force were
    # lost on resume: growth was measured from the first window after it (1.0 there) and a
    # warning still in force was logged again.
    monitor = MonitorConfig(every=2, min_effective_share=1.0, max_logit_growth=0.0, max_dead_experts=-1)
    for name in ("full", "split"):
        cfg = dataclasses.replace(make_cfg(tmp_path / name, steps=6), monitor=monitor)
        if name == "split":
            assert train(cfg, progress=False, stop_at=4).step == 4
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
        train(cfg, progress=False)
    full, split = records(tmp_path / "full", "collapse"), records(tmp_path / "split", "collapse")
    assert [r["step"] for r in split] == [2, 4, 6]
    growth = [[layer["logit_growth"] for layer in r["layers"]] for r in full]
    assert growth[2] != [1.0, 1.0], "the logits must have moved for the test to see a baseline"
    assert split == full


def test_grad_accum_matches_one_big_batch(tmp_path):
    # The two micro-batches of 4 draw the same windows as one batch of 8; without the
    # aux loss (nonlinear in the batch) the first step's loss and gradient must agree.
    runs = {"accum": {"batch_size": 4, "grad_accum": 2}, "big": {"batch_size": 8, "grad_accum": 1}}
    first = {}
    for name, kw in runs.items():
        train(make_cfg(tmp_path / name, steps=1, moe={"aux_loss_coef": 0.0}, **kw), progress=False)
        first[name] = records(tmp_path / name, "train")[0]
    for key in ("loss", "grad_norm"):
        assert math.isclose(first["accum"][key], first["big"][key], rel_tol=1e-4), key


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    result = train(make_cfg(tmp_path / "run", steps=2, resume=True), progress=False)
    assert result.step == 2 and "starting fresh" in capsys.readouterr().out


def test_resume_notes_a_run_of_the_same_overrides_in_another_order(tmp_path, capsys):
    """The default run folder spells the overrides in the order given: resuming with
    them reordered finds no checkpoint, and says where the run is."""
    first = tmp_path / "tiny,train.steps=2,moe.aux_loss_coef=0.0"
    train(make_cfg(first, steps=2), progress=False)
    capsys.readouterr()
    train(
        make_cfg(tmp_path / "tiny,moe.aux_loss_coef=0.0,train.steps=2", steps=2, resume=True), progress=False
    )
    out = capsys.readouterr().out
    assert "starting fresh" in out and f"another order has checkpoints: {first}" in out


def test_resume_with_other_data_says_so_and_records_it(tmp_path, capsys):
    """Training on with other data is allowed, but another seed draws another train/val
    split: the resume says which data fields changed, and metrics.jsonl keeps it."""
    train(make_cfg(tmp_path / "run", steps=2), progress=False)
    capsys.readouterr()
    cfg = make_cfg(tmp_path / "run", steps=3, resume=True)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=cfg.data.seed + 1))
    train(cfg, progress=False)
    out = capsys.readouterr().out
    seed = cfg.data.seed
    assert f"resuming with other data than the checkpoint's (data.seed: {seed - 1} -> {seed})" in out, out
    assert records(tmp_path / "run", "resume") == [
        {"type": "resume", "step": 2, "data_changes": [f"data.seed: {seed - 1} -> {seed}"]}
    ]
    # The run's config is now the new one: resuming with it says nothing more.
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4)), progress=False)
    assert "other data" not in capsys.readouterr().out


def test_resume_past_train_steps_says_there_is_nothing_to_train(tmp_path, capsys):
    train(make_cfg(tmp_path / "run", steps=4), progress=False)
    capsys.readouterr()
    result = train(make_cfg(tmp_path / "run", steps=2, resume=True), progress=False)
    assert result.step == 4
    assert "checkpoint is at step 4, train.steps=2: nothing to train" in capsys.readouterr().out


def test_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    train(make_cfg(tmp_path / "empty", steps=2), progress=False)  # an empty folder is fine
    with pytest.raises(ValueError, match=r"train\.out_dir: .*already holds a run.*train\.resume=true"):
        train(make_cfg(tmp_path / "empty", steps=2), progress=False)
    with pytest.raises(ValueError, match=r"moe\.num_experts.*differs from the checkpoint"):
        train(make_cfg(tmp_path / "empty", steps=4, resume=True, moe={"num_experts": 16}), progress=False)


def test_vocab_size_checked_against_data(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    cfg.model.vocab_size = 100
    with pytest.raises(ValueError, match="model.vocab_size"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_bfloat16_autocast_trains(tmp_path):
    result = train(make_cfg(tmp_path / "run", steps=2, dtype="bfloat16", grad_clip=0.0), progress=False)
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    assert records(tmp_path / "run", "train")[0]["grad_norm"] > 0, "norm logged even without clipping"


def test_nan_stops_with_step_and_layer_and_keeps_good_checkpoint(tmp_path, monkeypatch):
    import moge.training.loop as train_mod

    real_build = train_mod.build_optimizer
    calls = {"n": 0}

    def poison_router(layer, args):
        calls["n"] += 1
        if calls["n"] == 5:  # the forward of step 5
            with torch.no_grad():
                layer.router.weight[0, 0] = float("nan")

    def build_and_hook(model, tc):
        model.blocks[1].ffn.register_forward_pre_hook(poison_router)
        return real_build(model, tc)

    monkeypatch.setattr(train_mod, "build_optimizer", build_and_hook)
    run = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError, match=r"step 5: .*layer 1 \(MoE\): non-finite router scores"
    ) as err:
        train(make_cfg(run, steps=8, save_every=2), progress=False)
    assert "blocks.1.ffn.router.weight" in str(err.value)
    assert find_checkpoint(run).name == "step_00000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "LATEST",
        "step_00000002",
        "step_00000004",
    ]
    weights = {k: v for k, v in read_tensors(run).items() if k.startswith("model.")}
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4]


def test_nonfinite_gradient_stops_before_the_update(tmp_path, monkeypatch):
    import moge.training.loop as train_mod

    real_build = train_mod.build_optimizer
    calls = {"n": 0}

    def nan_grad(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("nan")) if calls["n"] == 3 else grad

    def build_and_hook(model, tc):
        model.blocks[0].attn.q_proj.weight.register_hook(nan_grad)
        return real_build(model, tc)

    monkeypatch.setattr(train_mod, "build_optimizer", build_and_hook)
    run = tmp_path / "run"
    expected = (
        r"step 3: the gradient norm is not finite.*in 1 parameter\(s\): blocks\.0\.attn\.q_proj\.weight"
    )
    with pytest.raises(NonFiniteLossError, match=expected):
        train(make_cfg(run, steps=6, save_every=2), progress=False)
    assert find_checkpoint(run).name == "step_00000002"


def test_optimizer_is_torchs_fused_adamw_and_steps_like_the_default():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    copy = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    copy.load_state_dict(model.state_dict())
    tc = TrainConfig()
    fused = build_optimizer(model, tc)
    assert fused.defaults["fused"] is True
    groups = [{"params": [p for p in copy.parameters() if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in copy.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    plain = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), foreach=False)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opt in ((model, fused), (copy, plain)):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), copy.parameters()):
        assert_close(a, b)
