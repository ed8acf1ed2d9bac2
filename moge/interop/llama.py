"""Dense Llama and Qwen2 (transformers' LlamaForCausalLM, Qwen2ForCausalLM): every block dense.

Llama: `attention_bias` puts a bias on all of q/k/v/o; Qwen2: q/k/v always biased, o never.
Biases a model lacks but the layout has are written as zeros (the same model).
moge holds them as a model whose `first_dense_layers` is n_layers (no MoE layer).
"""

from __future__ import annotations

from moge.interop.hfconfig import (
    CLASS_DEFAULTS,
    base_config_json,
    base_model_config,
    dense_moe_placeholder,
    get_bool,
    need_int,
    refuse,
)
from moge.interop.mapping import BaseLayout, Piece, decoder_pieces, swiglu_pieces
from moge.layer import MoGEConfig
from moge.model.config import ModelConfig


def _dense_pieces(m: ModelConfig, biases: str) -> list[Piece]:
    out = decoder_pieces(m, biases)
    for i in range(m.n_layers):
        out += swiglu_pieces(f"model.layers.{i}.mlp", f"blocks.{i}.ffn", m.resolved_dense_hidden)
    return out


def _check_dense(name: str, m: ModelConfig) -> None:
    if any(m.is_moe_layer(i) for i in range(m.n_layers)):
        raise refuse(name, "MoE layers", "a dense layout; use qwen2_moe, qwen3_moe, mixtral or pangu")
    if m.qk_norm:
        raise refuse(name, "q/k norms (model.qk_norm)", "no tensor for them")


class LlamaLayout(BaseLayout):
    name = "llama"
    model_types: tuple[str, ...] = ("llama",)

    def read_config(self, hf: dict, where: str) -> tuple[ModelConfig, MoGEConfig]:
        if get_bool(hf, "mlp_bias", where, False):
            raise ValueError(f"{where}: mlp_bias is true; moge's SwiGLUs have no biases")
        bias = get_bool(hf, "attention_bias", where, False)
        n = need_int(hf, "num_hidden_layers", where)
        m = base_model_config(
            hf, where, CLASS_DEFAULTS["llama"], qkv_bias=bias, o_bias=bias, dense_hidden=need_int(hf, "intermediate_size", where),
            first_dense_layers=n,
        )  # fmt: skip
        return m, dense_moe_placeholder(m.d_model)

    def write_config(self, m: ModelConfig, e: MoGEConfig) -> dict:
        _check_dense(self.name, m)
        if m.d_model % m.n_heads:
            raise refuse(
                self.name, f"d_model {m.d_model} with {m.n_heads} heads",
                "LlamaConfig requires hidden_size to be a multiple of num_attention_heads, head_dim or not",
            )  # fmt: skip
        cfg = base_config_json(m, "LlamaForCausalLM", "llama")
        # One flag for all four: a model with only some biases writes zeros for the others.
        cfg.update(
            intermediate_size=m.resolved_dense_hidden, attention_bias=m.qkv_bias or m.o_bias, mlp_bias=False
        )
        return cfg

    def pieces(self, m: ModelConfig, e: MoGEConfig) -> list[Piece]:
        return _dense_pieces(m, "qkvo" if m.qkv_bias or m.o_bias else "")


class Qwen2Layout(BaseLayout):
    name = "qwen2"
    model_types: tuple[str, ...] = ("qwen2",)

    def read_config(self, hf: dict, where: str) -> tuple[ModelConfig, MoGEConfig]:
        n = need_int(hf, "num_hidden_layers", where)
        m = base_model_config(
            hf, where, CLASS_DEFAULTS["qwen2"], qkv_bias=True, o_bias=False, dense_hidden=need_int(hf, "intermediate_size", where),
            first_dense_layers=n,
        )  # fmt: skip
        return m, dense_moe_placeholder(m.d_model)

    def write_config(self, m: ModelConfig, e: MoGEConfig) -> dict:
        _check_dense(self.name, m)
        if m.o_bias:
            raise refuse(self.name, "an o_proj bias", "Qwen2 has q/k/v biases only")
        # head_dim: not a Qwen2Config field, but Qwen2Attention reads config.head_dim when
        # config.json has it (as the reader here does), else hidden_size / heads.
        cfg = base_config_json(m, "Qwen2ForCausalLM", "qwen2")
        cfg.update(intermediate_size=m.resolved_dense_hidden, use_sliding_window=False)
        return cfg

    def pieces(self, m: ModelConfig, e: MoGEConfig) -> list[Piece]:
        return _dense_pieces(m, "qkv")  # always biased: zeros when the model has none
