"""Domain sub-models (moge.sigma.extract, `moge extract`): exact logits, params, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from moge.cli import main
from moge.model import MoGETransformer, count_parameters, format_params
from moge.sigma.extract import extract_model
from moge.sigma.report import domain_val_loss
from moge.tools.evaluate import evaluate_run
from moge.training import train
from moge.training.checkpoint import load_run
from moge.training.config import config_from_dict
from moge.training.data import load_dataset

DOMAINS = {"statements": [0, 5], "expressions": [1, 4], "library": [2, 7], "datamodel": [3, 6]}
RAW = {
    "name": "sigma",
    "model": {"d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32,
              "first_dense_layers": 1, "dense_hidden": 48, "qkv_bias": True},
    "moe": {"num_experts": 24, "num_groups": 8, "top_k": 4, "expert_hidden": 16, "router": "random",
            "rre_domain_groups": DOMAINS, "num_shared_experts": 1, "learned_expert_scale": True,
            "bias_update_rate": 0.01, "rre_seed": 5},
    "data": {"seq_len": 32, "domains": "topics"},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1,
              "save_every": 0, "threads": 1},
    "eval": {"batches": 2, "batch_size": 4, "plots": False},
}  # fmt: skip


@pytest.fixture(scope="module")
def full():
    cfg = config_from_dict(RAW)
    torch.manual_seed(0)
    model = MoGETransformer(cfg.model, cfg.moe).eval()
    with torch.no_grad():  # weights away from their init: scales, biases and norms all matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in model.moe_layers():
            layer.balance_bias_E.normal_()
    return model, cfg, load_dataset(cfg.data)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_sub_model_logits_equal_the_full_models_exactly(full, domain):
    model, cfg, ds = full
    sub, sub_cfg = extract_model(model, cfg, domain)
    for batch in ds.iter_eval_batches("val", 8, 2, domain=domain):
        x_BL, y_BL = batch
        with torch.no_grad():
            want = model(x_BL, y_BL, domain_ids=batch.domain_ids)
            got = sub(x_BL, y_BL)  # one domain: no domain ids needed
        assert torch.equal(got.logits, want.logits)
        assert torch.equal(got.lm_loss, want.lm_loss)
    n_full = sum(p.numel() for p in model.parameters())
    n_sub = sum(p.numel() for p in sub.parameters())
    per_expert = 3 * 32 * 16 + 32 + 1  # SwiGLU weights, a router row, the learned scale
    assert n_full - n_sub == 2 * (24 - 6) * per_expert  # 2 MoE layers, 18 experts dropped each
    assert count_parameters(sub_cfg.model, sub_cfg.moe).total == n_sub
    # Per token the same experts run; only the dropped experts' router rows are gone.
    activated = count_parameters(cfg.model, cfg.moe).activated - 2 * 18 * 32
    assert count_parameters(sub_cfg.model, sub_cfg.moe).activated == activated
    print(f"\n{domain}: sub-model {format_params(n_sub)} ({n_sub:,}) of {format_params(n_full)} ({n_full:,}) "
          f"parameters: {1 - n_sub / n_full:.1%} saved")  # fmt: skip


def test_a_sub_model_of_a_sub_model_is_still_exact(full):
    model, cfg, ds = full
    sub, sub_cfg = extract_model(model, cfg, "library")
    assert sub_cfg.moe.rre_group_ids == [2, 7] and sub_cfg.moe.rre_domain_groups == {"library": [0, 1]}
    again, again_cfg = extract_model(sub, sub_cfg, "library")
    assert again_cfg.moe.rre_group_ids == [2, 7]
    batch = next(ds.iter_eval_batches("val", 4, 1, domain="library"))
    with torch.no_grad():
        assert torch.equal(again(batch[0]).logits, model(batch[0], domain_ids=batch.domain_ids).logits)


def test_a_bf16_model_gives_a_bf16_sub_model_of_copies(full):
    model, cfg, ds = full
    half = MoGETransformer(cfg.model, cfg.moe).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    sub, _ = extract_model(half, cfg, "datamodel")
    assert {p.dtype for p in sub.parameters()} == {torch.bfloat16}
    batch = next(ds.iter_eval_batches("val", 4, 1, domain="datamodel"))
    with torch.no_grad():
        want = half(batch[0], domain_ids=batch.domain_ids).logits
        assert torch.equal(sub(batch[0]).logits, want)
        for p in sub.parameters():  # copies: changing the sub-model leaves the full one alone
            p.zero_()
        assert torch.equal(half(batch[0], domain_ids=batch.domain_ids).logits, want)


def test_only_two_level_models_have_domains(full):
    model, cfg, _ = full
    with pytest.raises(
        ValueError, match="unknown domain 'chat'; the run's domains are statements, expressions"
    ):
        extract_model(model, cfg, "chat")
    plain = config_from_dict({**RAW, "moe": {**RAW["moe"], "rre_domain_groups": None, "top_k": 8}})
    with pytest.raises(ValueError, match="routes without domains"):
        extract_model(MoGETransformer(plain.model, plain.moe), plain, "library")
    assert extract_model(model, cfg, "2")[1].moe.rre_domain_groups == {"library": [0, 1]}  # by id
    with pytest.raises(ValueError, match="unknown domain '02'"):  # an id is written as one
        extract_model(model, cfg, "02")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sigma")
    cfg = config_from_dict({**RAW, "train": {**RAW["train"], "out_dir": str(folder / "run")}})
    n = torch.get_num_threads()
    train(cfg, progress=False)
    torch.set_num_threads(n)
    return folder


def test_extract_cli_writes_a_run_that_eval_and_generate_read(trained, capsys):
    run, out = trained / "run", trained / "library"
    assert main(["extract", str(run), "--domain", "library", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "domain 'library': groups [2, 7]" in printed and "fewer" in printed
    assert "(routed experts 6..8, 21..23)" in printed  # two groups of 3, not the 18 of 6..23
    info = json.loads((out / "extract.json").read_text())
    assert info["params_sub"] < info["params_full"] and info["experts"] == [6, 7, 8, 21, 22, 23]
    # moge eval: the sub-model on its domain's val windows = the full model on the same windows.
    report = evaluate_run(out, plots=False)
    # The full run evaluates too: its batches carry their domains to the model.
    full_report = evaluate_run(run, plots=False, out_dir=trained / "full-eval")
    assert full_report["val_loss"] > 0 and len(full_report["routing"]) == 2
    full_model, full_cfg, _ = load_run(run)
    want = domain_val_loss(full_model, load_dataset(full_cfg.data), "library", 4, 2)
    assert report["val_loss"] == want
    assert report["params"]["total"] == info["params_sub"]
    # The interop loader reads the sub-model's run folder as it is.
    import moge

    loaded, loaded_cfg = moge.from_pretrained(out)
    batch = next(load_dataset(full_cfg.data).iter_eval_batches("val", 4, 1, domain="library"))
    with torch.no_grad():
        want_logits = full_model(batch[0], domain_ids=batch.domain_ids).logits
        assert torch.equal(loaded(batch[0]).logits, want_logits)
    assert loaded_cfg.moe.rre_group_ids == [2, 7]
    # moge generate: greedy text of the sub-model = the full model's with the domain given.
    assert main(["generate", str(out), "--prompt", "The ", "--tokens", "6", "--temperature", "0"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    prompt = torch.tensor([list(b"The ")])
    full_ids = full_model.generate(prompt, 6, temperature=0.0, domain_ids=torch.tensor([2]))
    assert text == bytes(full_ids[0].tolist()).decode("utf-8", errors="replace")


def test_extract_cli_errors_are_one_line(trained, cli_error):
    run = str(trained / "run")
    assert "unknown domain 'chat'" in cli_error(["extract", run, "--domain", "chat", str(trained / "x")])
    (trained / "busy").mkdir()
    (trained / "busy" / "file").write_text("")
    assert "not an empty folder" in cli_error(["extract", run, "--domain", "library", str(trained / "busy")])
    line = cli_error(["generate", run, "--prompt", "a", "--tokens", "4"])
    assert "needs the domain of every sequence" in line and "moge extract" in line


def test_capacity_is_refused_with_domain_groups():
    """Capacity over all experts would drop other slots than a sub-model's: extraction would not be exact."""
    with pytest.raises(ValueError, match="capacity_factor: with rre_domain_groups"):
        config_from_dict({**RAW, "moe": {**RAW["moe"], "capacity_factor": 1.25}})
