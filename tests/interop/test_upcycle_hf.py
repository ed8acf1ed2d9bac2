"""Upcycling dense transformers models (Llama, Qwen2) with the real client as the reference.

transformers model -> save_pretrained -> moge upcycle -> logits equal to the transformers
model's; and out again: the upcycled model exported to the Pangu layout (run in the oracle
read from the released code) or to Qwen2-MoE (run by transformers) still gives the dense
model's logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
import yaml
from hf_cases import VOCAB, hf_model
from pangu_oracle import PanguOracle

from moge.cli import main
from moge.interop import save_pretrained
from moge.interop.upcycle import upcycle_model
from moge.interop.upcycle_run import load_dense
from moge.layer import MoGEConfig
from moge.training.checkpoint import load_run

D = 32  # hf_cases: hidden_size 32, intermediate_size 40


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0.1, "logits far from zero, so the tolerance means something"
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5)


def _tokens(seed: int = 0, B: int = 2, L: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def saved(request, tmp_path_factory):
    """(layout, transformers model, its save_pretrained folder)."""
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


# 40 dense units: shared 8 + 4 slices of 8 (one per group), or 4 slices of 10 in 4 groups of 4.
MOES = {
    "grouped-raw-slices-shared": dict(
        num_experts=8, num_groups=4, top_k=4, expert_hidden=8, num_shared_experts=1, learned_expert_scale=True
    ),  # fmt: skip
    "grouped-renormalised-slices-K2": dict(
        num_experts=16, num_groups=4, top_k=8, expert_hidden=10, normalize_weights=True
    ),  # fmt: skip
    "global-raw-copies": dict(num_experts=4, num_groups=1, top_k=2, expert_hidden=40, router="global"),
}


@pytest.mark.parametrize("moe", MOES.values(), ids=MOES.keys())
def test_upcycled_transformers_model_gives_its_logits(saved, moe):
    _, hf, path = saved
    up, _ = upcycle_model(load_dense(path), MoGEConfig(d_model=D, **moe), seed=1)
    x = _tokens()
    with torch.no_grad():
        _close(up(x).logits, hf(x).logits)
        assert torch.equal(
            up.generate(x, 6, temperature=0), hf.generate(x, max_new_tokens=6, do_sample=False)
        )


def test_cli_upcycles_a_layout_folder(saved, tmp_path, capsys):
    layout, hf, path = saved
    config = tmp_path / "up.yaml"
    moe = {k: v for k, v in MOES["grouped-raw-slices-shared"].items()}
    config.write_text(yaml.safe_dump({"moe": moe, "data": {"seq_len": 32}, "train": {"steps": 2}}))
    assert main(["upcycle", str(path), str(tmp_path / "up"), "--config", str(config)]) == 0
    assert "4 slices" in capsys.readouterr().out
    model, cfg, step = load_run(tmp_path / "up")
    assert step == 0 and cfg.model.vocab_size == VOCAB and cfg.model.qkv_bias
    x = _tokens(seed=3)
    with torch.no_grad():
        _close(model(x).logits, hf(x).logits)


def test_llama_upcycled_into_the_pangu_layout_runs_in_the_released_code_oracle(tmp_path):
    """Dense Llama (q/k/v/o biases) -> MoGE with Pangu's routing -> Pangu layout -> oracle."""
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "llama")
    moe = MoGEConfig(d_model=D, **MOES["grouped-raw-slices-shared"])
    up, plan = upcycle_model(load_dense(tmp_path / "llama"), moe)
    assert plan.expert_scale == 8.0  # 4 slices / (4 gates of 1/8): the released router_scale
    save_pretrained(up, tmp_path / "pangu", layout="pangu")
    oracle = PanguOracle(tmp_path / "pangu")
    x = _tokens(seed=4)
    with torch.no_grad():
        _close(oracle.logits(x), hf(x).logits)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "norm_topk_prob"])
def test_qwen2_upcycled_into_qwen2_moe_runs_in_transformers(tmp_path, normalize):
    """Dense Qwen2 -> global top-2 of 4 copies + gated shared expert -> Qwen2MoeForCausalLM."""
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path / "qwen2")
    moe = MoGEConfig(
        d_model=D, num_experts=4, num_groups=1, top_k=2, expert_hidden=32, num_shared_experts=1,
        shared_hidden=8, shared_expert_gate=True, router="global", normalize_weights=normalize,
    )  # fmt: skip
    up, plan = upcycle_model(load_dense(tmp_path / "qwen2"), moe, seed=2)
    assert plan.router_init == ("random" if normalize else "uniform")
    save_pretrained(up, tmp_path / "qwen2_moe", layout="qwen2_moe")
    moe_hf = T.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "qwen2_moe").eval()
    x = _tokens(seed=5)
    with torch.no_grad():
        _close(moe_hf(x).logits, hf(x).logits)


def test_token_ids_and_tokenizer_travel_through_upcycle_and_convert(tmp_path, capsys):
    """Qwen2 with special tokens, a generation config and a tokenizer -> moge upcycle ->
    moge convert --to qwen2_moe: transformers reads back the same ids, config and tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    hf = hf_model("qwen2")
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = 1, [2, 3], None
    hf.generation_config = T.GenerationConfig(bos_token_id=1, eos_token_id=[2, 3], max_new_tokens=7)
    hf.save_pretrained(tmp_path / "qwen2")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>").save_pretrained(
        tmp_path / "qwen2"
    )
    config = tmp_path / "up.yaml"
    moe = dict(num_experts=4, num_groups=1, top_k=2, expert_hidden=32, num_shared_experts=1,
               shared_hidden=8, shared_expert_gate=True, router="global")  # fmt: skip
    config.write_text(yaml.safe_dump({"moe": moe, "data": {"seq_len": 32}, "train": {"steps": 2}}))
    assert main(["upcycle", str(tmp_path / "qwen2"), str(tmp_path / "up"), "--config", str(config)]) == 0
    assert main(["convert", str(tmp_path / "up"), str(tmp_path / "out"), "--to", "qwen2_moe"]) == 0
    out = tmp_path / "out"
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, [2, 3], None)
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.max_new_tokens) == (1, [2, 3], 7)
    assert AutoTokenizer.from_pretrained(out)("w5 w7 </s>")["input_ids"] == [5, 7, 2]
    moe_hf = T.Qwen2MoeForCausalLM.from_pretrained(out).eval()
    x = _tokens(seed=6)
    with torch.no_grad():
        _close(moe_hf(x).logits, hf(x).logits)
