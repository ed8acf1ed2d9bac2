"""Mixtral (transformers' MixtralForCausalLM): every block MoE, global top-k, renormalised gates.

Softmax over all experts then renormalising the top k equals Mixtral's softmax over
the top-k logits. Experts are `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2` (down).
"""

from __future__ import annotations

from moge.interop.folder import LayoutFolder
from moge.interop.hfconfig import (
    CLASS_DEFAULTS,
    base_config_json,
    base_model_config,
    check_plain_routing,
    loss_config_json,
    need_int,
    refuse,
    router_aux_loss_coef,
    z_loss_coef,
)
from moge.interop.mapping import BaseLayout, Piece, decoder_pieces, expert_pieces
from moge.layer import MoGEConfig
from moge.model.config import ModelConfig

NAMES = ("w1", "w3", "w2")  # gate, up, down


class MixtralLayout(BaseLayout):
    name = "mixtral"
    model_types: tuple[str, ...] = ("mixtral",)

    def read_config(self, hf: dict, where: str) -> tuple[ModelConfig, MoGEConfig]:
        if hf.get("sliding_window") is not None:
            raise ValueError(
                f"{where}: sliding_window {hf['sliding_window']}: moge has full causal attention only"
            )
        m = base_model_config(hf, where, CLASS_DEFAULTS["mixtral"])
        K, E = need_int(hf, "num_experts_per_tok", where), need_int(hf, "num_local_experts", where)
        F, coef = need_int(hf, "intermediate_size", where), router_aux_loss_coef(hf, where)
        try:
            e = MoGEConfig(
                d_model=m.d_model, num_experts=E, num_groups=1, top_k=K,
                expert_hidden=F, router="global", normalize_weights=True,
                router_dtype="input",  # transformers' gate: logits in the model's dtype, softmax in float32
                aux_loss_coef=coef, aux_loss_type="released", z_loss_coef=z_loss_coef(hf, where),
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        return m, e

    def write_config(self, m: ModelConfig, e: MoGEConfig) -> dict:
        check_plain_routing(self.name, e, normalize=True)
        if any(not m.is_moe_layer(i) for i in range(m.n_layers)):
            raise refuse(self.name, "dense layers", "every Mixtral block is MoE")
        if e.shared_width:
            raise refuse(self.name, "shared experts", "Mixtral has none; try --to qwen2_moe or pangu")
        if m.qkv_bias or m.o_bias or m.qk_norm:
            raise refuse(self.name, "attention biases or q/k norms", "Mixtral attention has neither")
        cfg = base_config_json(m, "MixtralForCausalLM", "mixtral")
        cfg.update(
            num_local_experts=e.num_experts, num_experts_per_tok=e.top_k, intermediate_size=e.expert_hidden,
            router_jitter_noise=0.0, sliding_window=None, **loss_config_json(m, e),
        )  # fmt: skip
        return cfg

    def pieces(self, m: ModelConfig, e: MoGEConfig) -> list[Piece]:
        out = decoder_pieces(m)
        for i in range(m.n_layers):
            hf, mg = f"model.layers.{i}.block_sparse_moe", f"blocks.{i}.ffn"
            out.append(Piece(f"{hf}.gate.weight", f"{mg}.router.weight"))
            out += expert_pieces(f"{hf}.experts", f"{mg}.experts", e.num_experts, e.expert_hidden, NAMES)
        return out

    def prepare(self, folder: LayoutFolder) -> None:
        # transformers 5's in-memory names (mlp.gate, stacked mlp.experts) -> the saved ones.
        for key in list(folder.keys()):
            if key.endswith(".mlp.gate.weight"):
                folder.alias(key.replace(".mlp.gate.", ".block_sparse_moe.gate."), key)
        folder.alias_fused(_mixtral_names)


def _mixtral_names(prefix: str, e: int) -> tuple[str, str, str]:
    """prefix `model.layers.{i}.mlp` (in-memory) -> the saved `block_sparse_moe` expert names."""
    layer = prefix.removesuffix(".mlp")
    gate, up, down = (f"{layer}.block_sparse_moe.experts.{e}.{n}.weight" for n in NAMES)
    return gate, up, down
