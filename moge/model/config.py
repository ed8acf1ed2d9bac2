"""The decoder's configuration: the `model` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass

from moge._validate import check_bool, check_float, check_int, check_optional_int


@dataclass
class ModelConfig:
    """The decoder around the MoGE layers (defaults: a tiny byte-level model)."""

    vocab_size: int = 256  # 256: raw bytes, no tokenizer
    d_model: int = 128  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); divides n_heads
    head_dim: int | None = None  # None: d_model // n_heads
    qkv_bias: bool = False  # biases on the q, k, v projections (Pangu Pro MoE: true)
    o_bias: bool = False  # bias on the attention output projection (released Pangu code: true)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 256  # longest sequence the RoPE tables cover
    tie_embeddings: bool = False  # share the token embedding with the LM head
    dense_hidden: int | None = None  # width of dense SwiGLU layers; None: 4 * d_model
    first_dense_layers: int = 0  # the first N blocks use a dense FFN
    moe_every: int = 1  # after those, every N-th block is MoE, the rest dense
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    activation_checkpointing: bool = False  # recompute blocks in backward (less memory); counts once

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "max_seq_len",
            "moe_every",
        ):
            check_int(f"model.{name}", getattr(self, name), minimum=1)
        check_optional_int("model.head_dim", self.head_dim, minimum=1)
        check_optional_int("model.dense_hidden", self.dense_hidden, minimum=1)
        check_int("model.first_dense_layers", self.first_dense_layers, minimum=0)
        check_bool("model.qkv_bias", self.qkv_bias)
        check_bool("model.o_bias", self.o_bias)
        check_bool("model.qk_norm", self.qk_norm)
        check_bool("model.tie_embeddings", self.tie_embeddings)
        check_bool("model.activation_checkpointing", self.activation_checkpointing)
        check_float("model.rope_theta", self.rope_theta, minimum=0.0, strict_min=True)
        check_float("model.norm_eps", self.norm_eps, minimum=0.0, strict_min=True)
        check_float("model.init_std", self.init_std, minimum=0.0, strict_min=True)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads: {self.n_heads} does not divide d_model={self.d_model} "
                "(set model.head_dim to decouple them)"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"model.head_dim: RoPE needs an even head size, got {self.resolved_head_dim}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_dense_hidden(self) -> int:
        return self.dense_hidden or 4 * self.d_model

    def is_moe_layer(self, index: int) -> bool:
        """Whether block `index` (0-based) uses a MoGE FFN."""
        if index < self.first_dense_layers:
            return False
        return (index - self.first_dense_layers) % self.moe_every == 0
