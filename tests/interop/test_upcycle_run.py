"""Tests of moge/interop/upcycle_run.py and `moge upcycle`: dense run -> MoGE run -> moge train."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch.testing import assert_close

from moge.cli import main
from moge.interop.upcycle_run import upcycle_run
from moge.training.checkpoint import load_run
from moge.training.config import load_config
from moge.training.data import load_dataset

MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "dense_hidden": 64,
         "init_std": 0.2}  # fmt: skip
MOE = {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16, "num_shared_experts": 0,
       "learned_expert_scale": True, "aux_loss_coef": 0.001}  # fmt: skip
TRAIN = {"steps": 3, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "eval_every": 0,
         "eval_batches": 1, "save_every": 0, "threads": 1}  # fmt: skip
UPCYCLE = {"model": {"first_dense_layers": 0}, "moe": MOE, "data": {"seq_len": 32}, "train": TRAIN}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A 3-step dense run (every FFN dense) trained through the CLI."""
    folder = tmp_path_factory.mktemp("dense")
    config = folder / "dense.yaml"
    dense = {**UPCYCLE, "model": {**MODEL, "first_dense_layers": 2}}
    config.write_text(yaml.safe_dump(dense))
    n = torch.get_num_threads()
    code = main(["train", str(config), f"train.out_dir={folder / 'run'}"])
    torch.set_num_threads(n)
    assert code == 0
    return folder / "run"


@pytest.fixture
def upcycle_yaml(tmp_path):
    path = tmp_path / "up.yaml"
    path.write_text(yaml.safe_dump(UPCYCLE))
    return path


def first_batch_loss(run_dir) -> float:
    """LM loss of a run's newest weights on the first training batch a run of it draws."""
    model, cfg, _ = load_run(run_dir)
    dataset = load_dataset(cfg.data)
    x_BL, y_BL = dataset.get_batch(
        "train", cfg.train.batch_size, torch.Generator().manual_seed(cfg.data.seed)
    )
    with torch.no_grad():
        return model.train()(x_BL, y_BL).lm_loss.item()


def test_cli_upcycles_and_moge_train_continues_from_exact_weights(dense_run, upcycle_yaml, tmp_path, capsys):
    dst = tmp_path / "up"
    assert main(["upcycle", str(dense_run), str(dst), "--config", str(upcycle_yaml)]) == 0
    out = capsys.readouterr().out
    assert "4 slices" in out and f"moge train {dst / 'config.yaml'}" in out
    record = json.loads((dst / "upcycle.json").read_text())
    assert record["step0_max_abs_logit_diff"] < 1e-4 * max(1.0, record["step0_max_abs_logit"])
    assert record["plan"]["router_init"] == "uniform" and record["plan"]["expert_scale"] == 8.0
    cfg = load_config(dst / "config.yaml")
    assert cfg.train.resume and cfg.train.out_dir == str(dst) and cfg.model.first_dense_layers == 0
    assert cfg.model.dense_hidden == 64 and cfg.moe.expert_hidden == 16
    # The step-0 checkpoint holds the dense model's function: same loss on the same batch.
    assert first_batch_loss(dst) == pytest.approx(first_batch_loss(dense_run), rel=1e-5)
    n = torch.get_num_threads()
    assert main(["train", str(dst / "config.yaml")]) == 0
    torch.set_num_threads(n)
    records = [json.loads(line) for line in (dst / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    # Step 1 ran on the upcycled weights: its LM loss is the dense model's on that batch.
    assert train[0]["lm_loss"] == pytest.approx(first_batch_loss(dense_run), rel=1e-5)


def test_library_call_with_overrides_and_a_partial_moe_pattern(dense_run, upcycle_yaml, tmp_path):
    r = upcycle_run(
        dense_run, tmp_path / "up", upcycle_yaml,
        ["moe.normalize_weights=true", "model.first_dense_layers=1", "name=mine"], seed=4,
    )  # fmt: skip
    model, cfg, step = load_run(r.out_dir)
    assert step == 0 and cfg.name == "mine" and cfg.model.first_dense_layers == 1
    assert r.plan.router_init == "replicated" and r.max_abs_diff < 1e-4
    assert len(list(model.moe_layers())) == 1


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["moe.expert_hidden=24"], ["moe.expert_hidden", "do not split"]),
        (["moe.num_experts=16", "moe.expert_hidden=8"], ["num_groups:", "8 does not divide"]),
        (["model.d_model=48"], ["model.d_model: 48", "differs from the source model's 32"]),
        (["--router-init", "random"], ["router_init: random", "use uniform"]),
        (["train.stepz=3"], ["train.stepz: unknown key"]),
    ],
)
def test_cli_errors_are_one_line(dense_run, upcycle_yaml, tmp_path, cli_error, argv, fragments):
    options = (
        ["--config", str(upcycle_yaml), *argv] if "=" in argv[0] else [*argv, "--config", str(upcycle_yaml)]
    )
    line = cli_error(["upcycle", str(dense_run), str(tmp_path / "up"), *options])
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "up").exists()


def test_cli_refuses_a_non_empty_destination_and_a_moe_source(dense_run, upcycle_yaml, tmp_path, cli_error):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    line = cli_error(["upcycle", str(dense_run), str(tmp_path / "busy"), "--config", str(upcycle_yaml)])
    assert "is not an empty folder" in line
    up = tmp_path / "up"
    assert main(["upcycle", str(dense_run), str(up), "--config", str(upcycle_yaml)]) == 0
    line = cli_error(["upcycle", str(up), str(tmp_path / "again"), "--config", str(upcycle_yaml)])
    assert "the source model has MoE layers" in line
    line = cli_error(["upcycle", str(tmp_path / "nope"), str(tmp_path / "x"), "--config", str(upcycle_yaml)])
    assert "no such run" in line


def test_step0_logits_are_the_dense_logits(dense_run, upcycle_yaml, tmp_path):
    r = upcycle_run(dense_run, tmp_path / "up", upcycle_yaml)
    dense, _, _ = load_run(dense_run)
    up, _, _ = load_run(r.out_dir)
    x_BL = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(up(x_BL).logits, dense(x_BL).logits, rtol=1e-5, atol=1e-5)


def test_a_step0_mismatch_is_refused_before_anything_is_written(
    dense_run, upcycle_yaml, tmp_path, monkeypatch
):
    import moge.interop.upcycle_run as run

    real = run.upcycle_model

    def broken(*args, **kw):
        model, plan = real(*args, **kw)
        with torch.no_grad():
            model.blocks[0].ffn.expert_scale_E.mul_(1.01)
        return model, plan

    monkeypatch.setattr(run, "upcycle_model", broken)
    with pytest.raises(RuntimeError, match="upcycling is not exact"):
        upcycle_run(dense_run, tmp_path / "up", upcycle_yaml)
    assert not (tmp_path / "up").exists()


def test_config_is_read_as_strictly_as_moge_train_reads_it(dense_run, upcycle_yaml, tmp_path, cli_error):
    """A duplicate section is refused (plain YAML would keep the second silently), and a
    preset name resolves as for `moge train` (here to a file of the working folder)."""
    dup = tmp_path / "dup.yaml"
    dup.write_text(upcycle_yaml.read_text() + "moe:\n  num_experts: 4\n")
    line = cli_error(["upcycle", str(dense_run), str(tmp_path / "up"), "--config", str(dup)])
    assert "duplicate key 'moe'" in line
    assert not (tmp_path / "up").exists()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "my-upcycle.yaml").write_text(upcycle_yaml.read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        r = upcycle_run(dense_run, tmp_path / "up", "my-upcycle")
    assert load_run(r.out_dir)[1].name == "my-upcycle"


def test_step0_check_runs_every_domain_of_a_two_level_router():
    """PanGu-Sigma's router needs each sequence's domain: the check gives one of every domain."""
    from moge.interop.upcycle import upcycle_model
    from moge.interop.upcycle_run import _step0_check
    from moge.layer import MoGEConfig
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, **{**MODEL, "first_dense_layers": 2})
    torch.manual_seed(0)
    dense = MoGETransformer(
        cfg, MoGEConfig(d_model=32, num_experts=2, num_groups=1, top_k=1, expert_hidden=8)
    )
    sigma = MoGEConfig(
        d_model=32, num_experts=8, num_groups=4, top_k=2, expert_hidden=64, router="random",
        rre_vocab_size=64, rre_domain_groups={"a": [0, 1], "b": [2, 3], "c": [1, 2]}, aux_loss_coef=0.0,
    )  # fmt: skip
    up, _ = upcycle_model(dense.eval(), sigma)
    diff, scale = _step0_check(dense, up, seed=0)
    assert scale > 0.1 and diff < 1e-5 * scale
