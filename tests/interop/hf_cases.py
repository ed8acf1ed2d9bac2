"""Tiny random transformers models of every supported layout (the real client in the tests)."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 96
_BASE = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
)  # fmt: skip


def _cases() -> dict:
    return {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**_BASE, attention_bias=True)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**_BASE, tie_word_embeddings=True)),
        "qwen3_moe": (
            T.Qwen3MoeForCausalLM,
            T.Qwen3MoeConfig(
                **{**_BASE, "num_hidden_layers": 3},
                num_experts=6,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                norm_topk_prob=True,
                mlp_only_layers=[0],
                head_dim=12,
            ),
        ),  # fmt: skip
        "qwen2_moe": (
            T.Qwen2MoeForCausalLM,
            T.Qwen2MoeConfig(
                **{**_BASE, "num_hidden_layers": 3},
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                decoder_sparse_step=2,
            ),
        ),  # fmt: skip
        "mixtral": (
            T.MixtralForCausalLM,
            T.MixtralConfig(**_BASE, num_local_experts=4, num_experts_per_tok=2),
        ),
    }


LAYOUT_NAMES = tuple(_cases())


def hf_model(layout: str, seed: int = 0) -> torch.nn.Module:
    """A transformers model of `layout` with weights ~ N(0, 0.2) (biases and norms included),
    so that logits and routing are far from uniform."""
    cls, cfg = _cases()[layout]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def hf_class(layout: str):
    return _cases()[layout][0]
