import pytest
import torch

from moge.model import MoGETransformer
from moge.tools.bench_generate import (
    format_generate_report,
    hf_greedy,
    load_hf_twin,
    main,
    moge_greedy,
    qwen3_shape,
    run_generate_benchmark,
)
from moge.training.config import config_from_dict

TINY = {
    "name": "gen-tiny",
    "model": {
        "vocab_size": 64,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 32,
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
}


def _twin(seed=0):
    """A model of the benchmark's Qwen3-MoE shape with weights ~ N(0, 0.2) (experts N(0, 1)):
    logits and routing far from ties, so the greedy tokens are a sharp test of equal maths."""
    cfg = qwen3_shape(config_from_dict(TINY))
    torch.manual_seed(seed)
    model = MoGETransformer(cfg.model, cfg.moe).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Routed experts 5x larger: their gates are ~1/E, and their output must move the tokens.
            p.normal_(0.0, 1.0 if "experts" in name else 0.2)
    return model


def test_qwen3_shape_is_what_the_layout_can_hold():
    cfg = qwen3_shape(config_from_dict(TINY))
    assert cfg.moe.router == "global" and cfg.moe.num_shared_experts == 0
    assert not cfg.moe.learned_expert_scale and cfg.model.qk_norm
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden) == (8, 2, 16)


@pytest.mark.parametrize("batch", [1, 3])
def test_moge_and_transformers_generate_the_same_greedy_tokens(batch):
    pytest.importorskip("transformers", minversion="5")
    model = _twin()
    hf = load_hf_twin(model, torch.float32)
    prompt = torch.randint(0, 64, (batch, 5), generator=torch.Generator().manual_seed(batch))
    ours, theirs = moge_greedy(model, prompt, 12), hf_greedy(hf, prompt, 12)
    assert ours.shape == (batch, 17)
    assert torch.equal(ours, theirs)
    # The test can fail: another model's weights give other tokens.
    assert not torch.equal(moge_greedy(_twin(seed=1), prompt, 12), theirs)


def test_report_rows_and_ratio():
    pytest.importorskip("transformers", minversion="5")
    cfg = config_from_dict(TINY)
    report = run_generate_benchmark(
        cfg, batches=(1, 2), prompt_len=4, new_tokens=3, rounds=2, warmup=0, log=print
    )
    names = {(r["batch"], r["name"]) for r in report["rows"]}
    assert len(names) == 6 and all(r["tokens_per_s"] > 0 for r in report["rows"])
    assert set(report["same_tokens"]) == {1, 2}  # random init: the tokens usually agree, not asserted
    text = format_generate_report(report, "tiny")
    assert "x transformers" in text and "load average" in text and "greedy tokens" in text
    assert report["machine"]["cpu_features"] in text  # the table names the CPU's matrix flags


def test_moge_only_and_bad_arguments():
    cfg = config_from_dict(TINY)
    report = run_generate_benchmark(
        cfg, batches=(2,), prompt_len=4, new_tokens=2, rounds=1, warmup=0, peers=False
    )
    assert [r["name"] for r in report["rows"]] == [
        "moge generate (Qwen3-MoE shape)",
        "moge generate (config as written)",
    ]
    assert report["same_tokens"] == {}
    with pytest.raises(ValueError, match="max_seq_len"):
        run_generate_benchmark(cfg, prompt_len=30, new_tokens=3, peers=False)
    with pytest.raises(ValueError, match="dtype"):
        run_generate_benchmark(cfg, prompt_len=4, new_tokens=2, peers=False, dtype="fp16")
    assert main(["does/not/exist.yaml", "--no-peers", "--quiet"]) == 2


def test_row_quartiles_lie_within_the_measured_rounds():
    from moge.tools import bench_generate

    case = bench_generate.DecodeCase("m", batch=2, decode=lambda p: p, seconds=[1.0, 2.0, 4.0])
    row = bench_generate._row(case, new_tokens=5)
    assert (row["q1_s"], row["median_s"], row["q3_s"]) == (1.5, 2.0, 3.0)
    assert row["tokens_per_s"] == pytest.approx(10 / 2.0)
    assert row["tokens_per_s_q1"] == pytest.approx(10 / 3.0)
