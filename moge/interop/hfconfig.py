"""config.json fields shared by the transformers-style layouts, and the refusals they share.

Every function names `where` (the config.json) and the field in its ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moge._validate import check_float, shown
from moge.balance import released_coefficient
from moge.layer import MoGEConfig
from moge.model.config import ModelConfig

# What each layout's own configuration class takes for a field config.json leaves out
# (transformers 5's LlamaConfig, Qwen2Config, MixtralConfig, Qwen2MoeConfig,
# Qwen3MoeConfig; the released PanguProMoEConfig), so that a sparse config.json builds
# the model its own code would build: Mixtral and Pangu normalise with eps 1e-5, the rest
# 1e-6. num_key_value_heads None: as many as the attention heads (Llama). Checked against
# the transformers classes by tests/interop/test_interop_hf.py.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, num_key_value_heads=None, rope_theta=1e4, max_position_embeddings=2048),
    "qwen2": dict(rms_norm_eps=1e-6, num_key_value_heads=32, rope_theta=1e4, max_position_embeddings=32768),
    "mixtral": dict(rms_norm_eps=1e-5, num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=131072),
    "qwen2_moe": dict(
        rms_norm_eps=1e-6, num_key_value_heads=16, rope_theta=1e4, max_position_embeddings=32768
    ),
    "qwen3_moe": dict(
        rms_norm_eps=1e-6, num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=32768
    ),
    "pangu": dict(rms_norm_eps=1e-5, num_key_value_heads=8, rope_theta=1.6e7, max_position_embeddings=131072),
}


def dense_pattern(n_layers: int, moe_layers: set[int], where: str) -> tuple[int, int]:
    """(first_dense_layers, moe_every) giving exactly `moe_layers`, or ValueError."""
    if not moe_layers:
        return n_layers, 1
    first = min(moe_layers)
    rest = sorted(moe_layers)
    every = rest[1] - rest[0] if len(rest) > 1 else max(n_layers - first, 1)
    m = ModelConfig(n_layers=n_layers, first_dense_layers=first, moe_every=every)
    if set(moe_layers_of(m)) != moe_layers:
        raise ValueError(
            f"{where}: MoE layers {sorted(moe_layers)} do not follow moge's pattern "
            "(the first N layers dense, then every k-th layer MoE)"
        )
    return first, every


def moe_layers_of(m: ModelConfig) -> list[int]:
    return [i for i in range(m.n_layers) if m.is_moe_layer(i)]


def need(hf: dict, key: str, where: str):
    if key not in hf or hf[key] is None:
        raise ValueError(f"{where}: config.json lacks the field {key!r}")
    return hf[key]


def as_int(value: Any, field: str, where: str) -> int:
    """A size or count from config.json as an int; else ValueError naming where, field, value.

    An integral float (128.0, as some converters write sizes) is that integer; int() would
    also turn 128.7 into 128, a string into a TypeError and true into 1, each building
    another model than the file describes (or failing without naming the field).
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{where}: {field}: expected an integer, got {shown(value)} ({type(value).__name__})"
        )
    return value


def need_int(hf: dict, key: str, where: str) -> int:
    """as_int of a field config.json must have."""
    return as_int(need(hf, key, where), key, where)


def as_bool(value: Any, field: str, where: str) -> bool:
    """A true/false field from config.json; else ValueError naming where, field, value.

    JSON true or false only: bool() read the string "false" as True, and 0 / 1 as flags
    (transformers 5's configuration classes refuse all three), building another model.
    """
    if not isinstance(value, bool):
        raise ValueError(
            f"{where}: {field}: expected true or false, got {shown(value)} ({type(value).__name__})"
        )
    return value


def get_bool(hf: dict, key: str, where: str, default: bool) -> bool:
    """as_bool of an optional field; left out or null: `default` (its class's default)."""
    value = hf.get(key)
    return default if value is None else as_bool(value, key, where)


def as_float(
    value: Any, field: str, where: str, *, minimum: float | None = None, strict_min: bool = False
) -> float:
    """A real number from config.json as a float; else ValueError naming where, field, value.

    A JSON int or float, finite (no field here means anything by NaN or inf, which Python's
    json reads), at least `minimum` (above it with strict_min). float() took "1e-6" and
    true (1.0), and let NaN through to a model that computes NaN.
    """
    try:
        check_float(field, value, minimum=minimum, strict_min=strict_min)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return float(value)


def get_float(hf: dict, key: str, where: str, default: float, **limits) -> float:
    """as_float of an optional field; left out or null: `default`."""
    value = hf.get(key)
    return default if value is None else as_float(value, key, where, **limits)


def router_aux_loss_coef(hf: dict, where: str) -> float:
    """The balance-loss coefficient c; left out or null: 0.001, the default of every MoE
    layout's configuration class (transformers' and the released Pangu one)."""
    return get_float(hf, "router_aux_loss_coef", where, 0.001, minimum=0.0)


# transformers' Qwen2-MoE, Qwen3-MoE and Mixtral configs and the released Pangu one have
# no router z-loss field (router_z_loss_coef is Switch Transformers' and NLLB-MoE's):
# moge keeps MoGEConfig.z_loss_coef under its own key, an attribute their classes keep
# and their models never read (none of them adds a z-loss).
Z_LOSS_KEY = "moge_z_loss_coef"


def z_loss_coef(hf: dict, where: str) -> float:
    """moge's router z-loss weight from config.json; left out or null: 0 (off)."""
    return get_float(hf, Z_LOSS_KEY, where, 0.0, minimum=0.0)


def loss_config_json(m: ModelConfig, e: MoGEConfig) -> dict:
    """The training-objective fields of an MoE layout's config.json.

    router_aux_loss_coef: the released objective's c (balance.released_coefficient).
    output_router_logits: true when c > 0, since transformers' (and the released Pangu)
    ForCausalLM adds c * aux_loss to a forward's loss with labels only when it is set: a
    model trained with a balance loss fine-tunes with it there too, not silently without.
    The z-loss weight goes under Z_LOSS_KEY when on (no transformers layout computes it).
    """
    c = released_coefficient(e.aux_loss_coef, e.aux_loss_type, e.top_k, len(moe_layers_of(m)))
    out: dict[str, Any] = {"router_aux_loss_coef": c, "output_router_logits": c > 0}
    if e.z_loss_coef:
        out[Z_LOSS_KEY] = e.z_loss_coef
    return out


def rope_theta(hf: dict, where: str) -> float:
    """rope_theta as transformers 5 resolves it (PreTrainedConfig.convert_rope_params_to_dict):
    a legacy rope_scaling replaces rope_parameters whole; the kind is its rope_type, else
    its legacy `type`; the theta its rope_theta, else the top-level field."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(field) or {}
    if not isinstance(params, dict):  # a string or list would fail below on .get, unnamed
        raise ValueError(
            f"{where}: {field}: expected an object, got {shown(params)} ({type(params).__name__})"
        )
    kind = params["rope_type"] if "rope_type" in params else params.get("type", "default")
    if kind != "default":
        raise ValueError(
            f"{where}: {field}: rope_type {kind!r}: moge implements plain RoPE only (rope_type default)"
        )
    name = f"{field}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError(
            f"{where}: config.json gives no rope_theta (neither {field}.rope_theta nor rope_theta)"
        )
    return as_float(theta, name, where, minimum=0.0, strict_min=True)


def check_silu(hf: dict, where: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN: both names are SiLU
        raise ValueError(f"{where}: hidden_act {act!r}: moge's FFNs are SwiGLU (silu)")


def check_no_sliding(hf: dict, where: str) -> None:
    if get_bool(hf, "use_sliding_window", where, False):
        raise ValueError(f"{where}: use_sliding_window is true; moge has full causal attention only")


def base_model_config(hf: dict, where: str, defaults: Mapping[str, Any], **fields) -> ModelConfig:
    """The ModelConfig fields every layout names the same way; `fields` adds the rest.
    defaults: the layout's CLASS_DEFAULTS, for the fields config.json leaves out (or sets
    to null; a null num_key_value_heads means as many as the attention heads)."""
    kv = hf["num_key_value_heads"] if "num_key_value_heads" in hf else defaults.get("num_key_value_heads")
    hf = {**defaults, **{k: v for k, v in hf.items() if v is not None}}
    check_silu(hf, where)
    check_no_sliding(hf, where)
    heads, d = need_int(hf, "num_attention_heads", where), need_int(hf, "hidden_size", where)
    kv = None if kv is None else as_int(kv, "num_key_value_heads", where)
    head_dim = hf.get("head_dim")
    head_dim = None if head_dim is None else as_int(head_dim, "head_dim", where)
    kwargs: dict[str, Any] = dict(
        vocab_size=need_int(hf, "vocab_size", where),
        d_model=d,
        n_layers=need_int(hf, "num_hidden_layers", where),
        n_heads=heads,
        n_kv_heads=heads if kv is None else kv,  # 0: refused (transformers divides by it), not MHA
        head_dim=head_dim if head_dim and heads and head_dim != d // heads else None,
        rope_theta=rope_theta(hf, where),
        norm_eps=as_float(hf["rms_norm_eps"], "rms_norm_eps", where, minimum=0.0, strict_min=True),
        max_seq_len=need_int(hf, "max_position_embeddings", where),
        tie_embeddings=get_bool(hf, "tie_word_embeddings", where, False),
        init_std=get_float(hf, "initializer_range", where, 0.02, minimum=0.0, strict_min=True),
    )
    kwargs.update(fields)
    try:
        return ModelConfig(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def base_config_json(m: ModelConfig, arch: str, model_type: str) -> dict:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def dtype_json(dtype: torch.dtype) -> dict[str, str]:
    """The config.json fields naming the weights' dtype, so that transformers'
    from_pretrained(dtype="auto") loads the model in it: "dtype" as transformers 5's
    save_pretrained writes it ("bfloat16"), and the same under "torch_dtype", the only key
    transformers 4 reads (5 takes "dtype" when both are there). moge's readers ignore both:
    each tensor's dtype is in its safetensors header."""
    name = str(dtype).removeprefix("torch.")
    return {"dtype": name, "torch_dtype": name}


def dense_moe_placeholder(d_model: int) -> MoGEConfig:
    """The `moe` section of a model without MoE layers (it builds nothing)."""
    return MoGEConfig(d_model=d_model, num_experts=1, num_groups=1, top_k=1, expert_hidden=1, router="global")


def refuse(layout: str, what: str, why: str = "") -> ValueError:
    return ValueError(f"layout {layout}: cannot express {what}" + (f" ({why})" if why else ""))


def check_dropless(layout: str, e: MoGEConfig) -> None:
    """Every layout's block (and DeepSeek-V3's) runs every token through its experts."""
    if e.capacity_factor is not None:
        raise refuse(
            layout, f"capacity_factor {e.capacity_factor}",
            "its block never drops a token, so the exported model would compute another function",
        )  # fmt: skip


def check_plain_routing(layout: str, e: MoGEConfig, *, normalize: bool | None) -> None:
    """The transformers MoE layouts: softmax over all experts, global top-k, nothing else."""
    if e.router != "global":
        raise ValueError(
            f"layout {layout}: the model uses the {e.router} router, and transformers has no MoGE "
            "(or other grouped) router, so the checkpoint would route differently; export it with "
            "--to pangu (the Pangu Pro MoE layout, which has the grouped router)"
            if e.router in ("grouped", "random", "group_limited")
            else f"layout {layout}: router {e.router}"
        )
    if e.score_func != "softmax":
        raise refuse(layout, f"score_func {e.score_func}", "its router is a softmax")
    if e.route_scale != 1.0:
        raise refuse(layout, f"route_scale {e.route_scale}", "no field for it")
    if e.learned_expert_scale:
        raise refuse(layout, "learned_expert_scale", "no tensor for it")
    if e.bias_update_rate > 0:
        raise refuse(layout, "the aux-loss-free balancing bias", "no tensor for it")
    if normalize is not None and e.normalize_weights != normalize:
        raise refuse(
            layout,
            f"normalize_weights={e.normalize_weights}",
            f"its gates are always renormalised={normalize}",
        )
