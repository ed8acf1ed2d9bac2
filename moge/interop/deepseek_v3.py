"""The DeepSeek-V3 MoE block (router, e_score_correction_bias, experts, shared experts) <-> one MoGELayer.

Layer level only: moge has no MLA attention, so whole DeepSeek-V3 models are not a layout.
The block maps to `router: group_limited` with sigmoid scores, groups ranked by the sum
of their two best biased scores, `topk_group` groups kept, gates from the unbiased
scores, renormalised when norm_topk_prob, times routed_scaling_factor. The correction
bias becomes the layer's `balance_bias_E` buffer, created here even when
bias_update_rate is 0 (then the layer routes with it and never changes it). Fields
config.json leaves out take DeepseekV3Config's defaults (HF_DEFAULTS), as transformers does.

Keys (relative to the block, e.g. `model.layers.3.mlp.`): gate.weight [E, D],
gate.e_score_correction_bias [E], experts.{e}.{gate,up,down}_proj.weight (or transformers
5's stacked experts.gate_up_proj / experts.down_proj), shared_experts.{gate,up,down}_proj.weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moge.interop.folder import LayoutFolder
from moge.interop.hfconfig import as_bool, as_float, as_int, check_dropless, check_silu, need_int
from moge.interop.mapping import Piece, check_pieces, expert_pieces, read_params, swiglu_pieces
from moge.layer import MoGEConfig, MoGELayer

BIAS = "gate.e_score_correction_bias"

# transformers' DeepseekV3Config defaults for the fields that change what the block
# computes: a config.json without them means these values to transformers, so to us too
# (a hand-written config without routed_scaling_factor is scaled by 2.5 there).
HF_DEFAULTS: dict[str, Any] = {
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_shared_experts": 1,
    "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
}  # fmt: skip


def _field(hf: dict, key: str) -> Any:
    return hf[key] if key in hf else HF_DEFAULTS[key]


def _normalize(hf: dict, where: str) -> bool:
    """norm_topk_prob; null is false: DeepseekV3Config takes None (bool | None) and its
    block renormalises only `if self.norm_topk_prob`."""
    value = _field(hf, "norm_topk_prob")
    return False if value is None else as_bool(value, "norm_topk_prob", where)


def _scale(hf: dict, where: str) -> float:
    value = _field(hf, "routed_scaling_factor")  # null: no number (transformers refuses it too)
    return as_float(value, "routed_scaling_factor", where, minimum=0.0, strict_min=True)


def block_config(hf: dict, where: str = "config.json", **overrides) -> MoGEConfig:
    """The MoGEConfig of one DeepSeek-V3 MoE block from config.json fields."""
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"{where}: only DeepSeek-V3's sigmoid scores with noaux_tc selection are supported")
    check_silu(hf, where)  # transformers' experts and shared experts apply ACT2FN[hidden_act]
    key = "n_routed_experts" if "n_routed_experts" in hf else "num_local_experts"
    if hf.get(key) is None:
        raise ValueError(f"{where}: config.json lacks the field 'n_routed_experts'")
    F = need_int(hf, "moe_intermediate_size", where)
    shared = as_int(_field(hf, "n_shared_experts") or 0, "n_shared_experts", where)
    fields: dict[str, Any] = dict(
        d_model=need_int(hf, "hidden_size", where), num_experts=as_int(hf[key], key, where),
        num_groups=as_int(_field(hf, "n_group"), "n_group", where),
        top_k=need_int(hf, "num_experts_per_tok", where), expert_hidden=F, num_shared_experts=shared,
        shared_hidden=F * shared or None, router="group_limited", score_func="sigmoid",
        topk_groups=as_int(_field(hf, "topk_group"), "topk_group", where), group_score="top2_sum",
        normalize_weights=_normalize(hf, where),
        route_scale=_scale(hf, where),
    )  # fmt: skip
    fields.update(overrides)
    try:
        return MoGEConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _pieces(cfg: MoGEConfig, prefix: str) -> list[Piece]:
    out = [Piece(f"{prefix}gate.weight", "router.weight"), Piece(f"{prefix}{BIAS}", "balance_bias_E")]
    out += expert_pieces(f"{prefix}experts", "experts", cfg.num_experts, cfg.expert_hidden)
    if cfg.shared_width:
        out += swiglu_pieces(f"{prefix}shared_experts", "shared", cfg.shared_width)
    return out


def _ensure_bias(layer: MoGELayer) -> None:
    """Give the layer its balance_bias_E buffer even when bias_update_rate is 0."""
    if layer.balance_bias_E is None:
        del layer.balance_bias_E  # a plain None attribute; a buffer of the same name replaces it
        layer.register_buffer("balance_bias_E", torch.zeros(layer.config.num_experts, dtype=torch.float32))


def _expert_names(prefix: str, e: int) -> tuple[str, str, str]:
    gate, up, down = (f"{prefix}.experts.{e}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))
    return gate, up, down


def _check_moe_layer(hf: dict, layer: int, where: str) -> None:
    """ValueError unless model.layers.{layer} exists and is an MoE block, as transformers
    builds it: every layer from first_k_dense_replace on."""
    n = hf.get("num_hidden_layers")
    n = None if n is None else as_int(n, "num_hidden_layers", where)
    if layer < 0 or (n is not None and layer >= n):
        raise ValueError(f"layer: {layer} is not a layer of the model ({where}: num_hidden_layers {n})")
    first = as_int(_field(hf, "first_k_dense_replace") or 0, "first_k_dense_replace", where)
    if layer < first:
        raise ValueError(
            f"layer: model.layers.{layer} is a dense MLP, not an MoE block ({where}: first_k_dense_replace {first})"
        )


def load_block(
    source: str | Path | dict[str, torch.Tensor],
    layer: int | None = None,
    config: dict | None = None,
    **overrides,
) -> MoGELayer:
    """A MoGELayer holding one DeepSeek-V3 MoE block's weights.

    source: a checkpoint folder (config.json + safetensors; `layer` picks
    model.layers.{layer}.mlp) or the block's own state dict (keys relative to the block;
    `config` then gives the config.json fields). overrides: MoGEConfig fields to change
    (e.g. expert_impl, bias_update_rate to keep balancing while fine-tuning).
    """
    if isinstance(source, dict):
        if config is None:
            raise ValueError("config: a state dict needs the config.json fields")
        prefix = "block."  # so that a bare block's keys look like a checkpoint's
        folder = LayoutFolder.from_tensors({prefix + k: v for k, v in source.items()}, config)
    else:
        folder = LayoutFolder(source)
        config = folder.config
        if layer is None:
            raise ValueError("layer: name the block to load (its index in model.layers)")
        _check_moe_layer(config, layer, str(folder.path / "config.json"))
        prefix = f"model.layers.{layer}.mlp."
    cfg = block_config(config, str(folder.path / "config.json"), **overrides)
    moe = MoGELayer(cfg)
    _ensure_bias(moe)
    pieces = _pieces(cfg, prefix)
    folder.alias_fused(_expert_names)
    target = moe.state_dict()
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    folder.where = {k: v for k, v in folder.where.items() if k.startswith(prefix)}  # other layers: not ours
    check_pieces(folder, pieces, shapes)
    for name, t in read_params(folder, pieces, shapes, dtype=None):
        target[name].copy_(t)
    return moe


def block_state_dict(layer: MoGELayer, prefix: str = "") -> dict[str, torch.Tensor]:
    """The layer's weights under DeepSeek-V3 block key names (a zero correction bias if it has none)."""
    c = layer.config
    if c.router != "group_limited" or c.score_func != "sigmoid" or c.group_score != "top2_sum":
        raise ValueError(
            "layout deepseek_v3: needs router group_limited, score_func sigmoid and group_score top2_sum; "
            f"got {c.router}, {c.score_func}, {c.group_score}"
        )
    if c.learned_expert_scale or c.shared_expert_gate:
        raise ValueError("layout deepseek_v3: cannot express learned_expert_scale or shared_expert_gate")
    check_dropless("deepseek_v3", c)
    state = dict(layer.state_dict())
    if "balance_bias_E" not in state:
        # float32 whatever the layer's dtype: transformers' DeepseekV3 keeps
        # e_score_correction_bias (and the gate) in float32 (_keep_in_fp32_modules_strict),
        # as moge keeps its balance_bias_E buffer.
        state["balance_bias_E"] = torch.zeros(c.num_experts, dtype=torch.float32)
    out = {}
    for p in _pieces(c, prefix):
        out[p.key] = p.region(state[p.param]).contiguous().clone()
    return out
