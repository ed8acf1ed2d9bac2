"""Pangu Pro MoE, as the released modelling code names and shapes it (PanguProMoEForCausalLM).

Every block MoE; q/k/v/o all with bias; head size hidden/heads; router `mlp.gate`
(softmax over all experts, the top expert of each group, no renormalisation) times the
learned `mlp.router_scale` [1, E]; one shared SwiGLU `mlp.shared_expert` added unweighted.
config.json has no field for the number of groups: the released code takes one expert
per group (8 groups, top-8), so groups = num_experts_per_tok, and only K/M = 1 exports.
The released code builds only 64 experts with top-8 (it hard-codes the 8 groups); other
shapes are written all the same, for readers that take groups = top-k (vllm-ascend).
A moge model without biases or expert scale exports zeros / ones for them (the same model).
"""

from __future__ import annotations

from moge.interop.hfconfig import (
    CLASS_DEFAULTS,
    base_config_json,
    base_model_config,
    loss_config_json,
    need_int,
    refuse,
    router_aux_loss_coef,
    z_loss_coef,
)
from moge.interop.mapping import BaseLayout, Piece, decoder_pieces, expert_pieces, swiglu_pieces
from moge.layer import MoGEConfig
from moge.model.config import ModelConfig

ARCH, MODEL_TYPE = "PanguProMoEForCausalLM", "PanguProMoE"
AUTO_MAP = {
    "AutoConfig": "configuration_pangu_moe.PanguProMoEConfig",
    "AutoModelForCausalLM": "modeling_pangu_moe.PanguProMoEForCausalLM",
}


class PanguLayout(BaseLayout):
    name = "pangu"
    model_types: tuple[str, ...] = (MODEL_TYPE,)

    def read_config(self, hf: dict, where: str) -> tuple[ModelConfig, MoGEConfig]:
        d, heads = need_int(hf, "hidden_size", where), need_int(hf, "num_attention_heads", where)
        if heads > 0 and d % heads:  # a non-positive count: ModelConfig names it, as for the others
            raise ValueError(f"{where}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
        hf = {**hf, "head_dim": None}  # the released attention derives it: hidden / heads
        m = base_model_config(hf, where, CLASS_DEFAULTS["pangu"], qkv_bias=True, o_bias=True)
        E, K = need_int(hf, "num_experts", where), need_int(hf, "num_experts_per_tok", where)
        # Read before the try: these errors already name config.json and their field.
        F = need_int(hf, "moe_intermediate_size", where)
        S = need_int(hf, "shared_expert_intermediate_size", where)
        coef, z = router_aux_loss_coef(hf, where), z_loss_coef(hf, where)
        try:
            e = MoGEConfig(
                d_model=m.d_model, num_experts=E, num_groups=K, top_k=K, expert_hidden=F,
                num_shared_experts=1, shared_hidden=S,
                router="grouped", learned_expert_scale=True,
                # The released gate is a Linear in the input's dtype (softmax in float32): in
                # bf16, float32 logits would pick another expert set for ~1.7% of tokens.
                router_dtype="input",
                # The released objective (Mixtral's function) with its coefficient: the same signal.
                aux_loss_coef=coef, aux_loss_type="released", z_loss_coef=z,
            )  # fmt: skip
        except ValueError as err:
            grouping = str(err).startswith(("num_groups", "top_k"))  # K = M: where their errors come from
            hint = " (groups = num_experts_per_tok: one expert per group)" if grouping else ""
            raise ValueError(f"{where}: {err}{hint}") from err
        return m, e

    def write_config(self, m: ModelConfig, e: MoGEConfig) -> dict:
        if e.router != "grouped":
            raise refuse(self.name, f"the {e.router} router", "the released block routes by groups (MoGE)")
        if e.top_k != e.num_groups:
            raise refuse(
                self.name, f"top_k={e.top_k} with num_groups={e.num_groups}",
                "the released block takes one expert per group, and config.json has no group count",
            )  # fmt: skip
        if e.score_func != "softmax" or e.normalize_weights or e.route_scale != 1.0:
            raise refuse(
                self.name, "sigmoid scores, renormalised gates or a route_scale", "none in the released block"
            )
        if e.bias_update_rate > 0:
            raise refuse(self.name, "the aux-loss-free balancing bias", "no tensor for it")
        if not e.shared_width or e.shared_expert_gate:
            raise refuse(
                self.name, "a model without one ungated shared expert", "the released block adds one"
            )
        if any(not m.is_moe_layer(i) for i in range(m.n_layers)):
            raise refuse(self.name, "dense layers", "every released block is MoE")
        if m.qk_norm:
            raise refuse(self.name, "q/k norms", "the released attention has none")
        if m.head_dim is not None and m.head_dim != m.d_model // m.n_heads:
            raise refuse(
                self.name, f"head_dim {m.head_dim}", "the released attention uses hidden_size / heads"
            )
        cfg = base_config_json(m, ARCH, MODEL_TYPE)
        for key in ("head_dim", "rope_parameters"):  # not fields of the released configuration
            del cfg[key]
        cfg.update(
            auto_map=AUTO_MAP, num_experts=e.num_experts, num_experts_per_tok=e.top_k,
            moe_intermediate_size=e.expert_hidden, shared_expert_intermediate_size=e.shared_width,
            **loss_config_json(m, e),
        )  # fmt: skip
        return cfg

    def pieces(self, m: ModelConfig, e: MoGEConfig) -> list[Piece]:
        out = decoder_pieces(m, biases="qkvo")  # the released attention has all four biases
        for i in range(m.n_layers):
            hf, mg = f"model.layers.{i}.mlp", f"blocks.{i}.ffn"
            out += [
                Piece(f"{hf}.gate.weight", f"{mg}.router.weight"),
                Piece(f"{hf}.router_scale", f"{mg}.expert_scale_E", shape=(1, e.num_experts), fill=1.0),
            ]
            out += expert_pieces(f"{hf}.experts", f"{mg}.experts", e.num_experts, e.expert_hidden)
            out += swiglu_pieces(f"{hf}.shared_expert", f"{mg}.shared", e.shared_width)
        return out
