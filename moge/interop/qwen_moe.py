"""Qwen2-MoE and Qwen3-MoE (transformers' Qwen2MoeForCausalLM, Qwen3MoeForCausalLM).

Both: softmax over all experts, global top-k, `norm_topk_prob` -> moge's
normalize_weights; dense blocks where `mlp_only_layers` or `decoder_sparse_step` say.
Qwen2-MoE: q/k/v biases, one shared expert scaled by sigmoid(shared_expert_gate(x)).
Qwen3-MoE: per-head q/k RMSNorm, `attention_bias` on q/k/v/o, no shared expert.
"""

from __future__ import annotations

from moge._validate import shown
from moge.interop.folder import LayoutFolder
from moge.interop.hfconfig import (
    CLASS_DEFAULTS,
    as_int,
    base_config_json,
    base_model_config,
    check_plain_routing,
    dense_pattern,
    get_bool,
    loss_config_json,
    need_int,
    refuse,
    router_aux_loss_coef,
    z_loss_coef,
)
from moge.interop.mapping import BaseLayout, Piece, decoder_pieces, expert_pieces, swiglu_pieces
from moge.layer import MoGEConfig
from moge.model.config import ModelConfig


def hf_moe_layers(hf: dict, n_layers: int, num_experts: int, where: str = "config.json") -> set[int]:
    """transformers' rule: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    only = _dense_only(hf, where)
    step = _sparse_step(hf, where)
    return {i for i in range(n_layers) if i not in only and num_experts > 0 and (i + 1) % step == 0}


def _dense_only(hf: dict, where: str) -> set[int]:
    """mlp_only_layers' indices; left out or null: none. Only a list: iterating a string or
    an object would read its characters or keys as layers, an int was a bare TypeError."""
    only = hf.get("mlp_only_layers")
    if only is None:
        return set()
    if not isinstance(only, list):
        raise ValueError(
            f"{where}: mlp_only_layers: expected a list of layer indices, got {shown(only)} ({type(only).__name__})"
        )
    return {as_int(i, "mlp_only_layers", where) for i in only}


def _sparse_step(hf: dict, where: str) -> int:
    """decoder_sparse_step; left out or null: 1. 0 read as 1 here (`or 1`) where transformers
    divides by it; a negative step means nothing either."""
    value = hf.get("decoder_sparse_step")
    step = 1 if value is None else as_int(value, "decoder_sparse_step", where)
    if step < 1:
        raise ValueError(f"{where}: decoder_sparse_step: must be >= 1, got {step}")
    return step


def _experts(hf: dict, where: str) -> int:
    key = "num_experts" if "num_experts" in hf else "num_local_experts"
    if hf.get(key) is None:
        raise ValueError(f"{where}: config.json lacks the field 'num_experts'")
    return as_int(hf[key], key, where)


def _moe_fields(hf: dict, where: str, *, shared: int) -> dict:
    K = need_int(hf, "num_experts_per_tok", where)
    return dict(
        num_experts=_experts(hf, where), num_groups=1, top_k=K,
        expert_hidden=need_int(hf, "moe_intermediate_size", where),
        num_shared_experts=1 if shared else 0, shared_hidden=shared or None, shared_expert_gate=bool(shared),
        router="global", normalize_weights=get_bool(hf, "norm_topk_prob", where, False),
        # Their gate is a Linear in the model's dtype (softmax in float32): in bf16, float32
        # logits would pick other experts than transformers does for some tokens.
        router_dtype="input",
        # Their objective (Mixtral's function) with their coefficient: the same training signal.
        aux_loss_coef=router_aux_loss_coef(hf, where), aux_loss_type="released",
        z_loss_coef=z_loss_coef(hf, where),
    )  # fmt: skip


def _moe_json(m: ModelConfig, e: MoGEConfig) -> dict:
    return {
        "num_experts": e.num_experts,
        "num_experts_per_tok": e.top_k,
        "moe_intermediate_size": e.expert_hidden,
        "norm_topk_prob": e.normalize_weights,
        "intermediate_size": m.resolved_dense_hidden,
        "mlp_only_layers": [i for i in range(m.n_layers) if not m.is_moe_layer(i)],
        "decoder_sparse_step": 1,
        "use_sliding_window": False,
        **loss_config_json(m, e),
    }


def _ffn_pieces(m: ModelConfig, e: MoGEConfig, shared_gate: bool) -> list[Piece]:
    out = []
    for i in range(m.n_layers):
        hf, mg = f"model.layers.{i}.mlp", f"blocks.{i}.ffn"
        if not m.is_moe_layer(i):
            out += swiglu_pieces(hf, mg, m.resolved_dense_hidden)
            continue
        out.append(Piece(f"{hf}.gate.weight", f"{mg}.router.weight"))
        out += expert_pieces(f"{hf}.experts", f"{mg}.experts", e.num_experts, e.expert_hidden)
        if e.shared_width:
            out += swiglu_pieces(f"{hf}.shared_expert", f"{mg}.shared", e.shared_width)
        if shared_gate:
            out.append(Piece(f"{hf}.shared_expert_gate.weight", f"{mg}.shared_gate.weight"))
    return out


def _per_expert_names(prefix: str, e: int) -> tuple[str, str, str]:
    return tuple(f"{prefix}.experts.{e}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))  # type: ignore[return-value]


class Qwen2MoeLayout(BaseLayout):
    name = "qwen2_moe"
    model_types: tuple[str, ...] = ("qwen2_moe",)

    def read_config(self, hf: dict, where: str) -> tuple[ModelConfig, MoGEConfig]:
        n = need_int(hf, "num_hidden_layers", where)
        shared = need_int(hf, "shared_expert_intermediate_size", where)
        if shared <= 0:
            raise ValueError(
                f"{where}: shared_expert_intermediate_size must be > 0 (moge has no zero-width expert)"
            )
        first, every = dense_pattern(n, hf_moe_layers(hf, n, _experts(hf, where), where), where)
        bias = get_bool(hf, "qkv_bias", where, True)  # null: the class default, as left out
        m = base_model_config(
            hf, where, CLASS_DEFAULTS["qwen2_moe"], qkv_bias=bias, o_bias=False, dense_hidden=need_int(hf, "intermediate_size", where),
            first_dense_layers=first, moe_every=every,
        )  # fmt: skip
        fields = _moe_fields(hf, where, shared=shared)  # outside the try: its errors already name config.json
        try:
            return m, MoGEConfig(d_model=m.d_model, **fields)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def write_config(self, m: ModelConfig, e: MoGEConfig) -> dict:
        check_plain_routing(self.name, e, normalize=None)
        if not e.shared_width or not e.shared_expert_gate:
            raise refuse(
                self.name, "a model without a gated shared expert",
                "Qwen2-MoE always scales one by sigmoid(shared_expert_gate(x)); try --to qwen3_moe or pangu",
            )  # fmt: skip
        if m.qk_norm or m.o_bias:
            raise refuse(self.name, "q/k norms or an o_proj bias", "Qwen2-MoE attention has neither")
        cfg = base_config_json(m, "Qwen2MoeForCausalLM", "qwen2_moe")
        # qkv_bias is new in transformers 5 (older versions always build the biases): always
        # true here, with zeros for a model without them.
        cfg.update(_moe_json(m, e), shared_expert_intermediate_size=e.shared_width, qkv_bias=True)
        return cfg

    def pieces(self, m: ModelConfig, e: MoGEConfig) -> list[Piece]:
        return decoder_pieces(m, "qkv") + _ffn_pieces(m, e, shared_gate=True)

    def prepare(self, folder: LayoutFolder) -> None:
        folder.alias_fused(_per_expert_names)


class Qwen3MoeLayout(BaseLayout):
    name = "qwen3_moe"
    model_types: tuple[str, ...] = ("qwen3_moe",)

    def read_config(self, hf: dict, where: str) -> tuple[ModelConfig, MoGEConfig]:
        n = need_int(hf, "num_hidden_layers", where)
        first, every = dense_pattern(n, hf_moe_layers(hf, n, _experts(hf, where), where), where)
        bias = get_bool(hf, "attention_bias", where, False)
        m = base_model_config(
            hf, where, CLASS_DEFAULTS["qwen3_moe"], qkv_bias=bias, o_bias=bias, qk_norm=True,
            dense_hidden=need_int(hf, "intermediate_size", where), first_dense_layers=first, moe_every=every,
        )  # fmt: skip
        fields = _moe_fields(hf, where, shared=0)  # outside the try: its errors already name config.json
        try:
            return m, MoGEConfig(d_model=m.d_model, **fields)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def write_config(self, m: ModelConfig, e: MoGEConfig) -> dict:
        check_plain_routing(self.name, e, normalize=None)
        if e.shared_width:
            raise refuse(self.name, "shared experts", "Qwen3-MoE has none; try --to qwen2_moe or pangu")
        if not m.qk_norm:
            raise refuse(self.name, "attention without q/k norms", "Qwen3-MoE always normalises q and k")
        cfg = base_config_json(m, "Qwen3MoeForCausalLM", "qwen3_moe")
        # One flag for all four (as Llama's): a model with only some biases writes zeros for the others.
        cfg.update(_moe_json(m, e), attention_bias=m.qkv_bias or m.o_bias)
        return cfg

    def pieces(self, m: ModelConfig, e: MoGEConfig) -> list[Piece]:
        return decoder_pieces(m, "qkvo" if m.qkv_bias or m.o_bias else "") + _ffn_pieces(
            m, e, shared_gate=False
        )

    def prepare(self, folder: LayoutFolder) -> None:
        folder.alias_fused(_per_expert_names)
