"""The decoder around the MoGE layers, with its own config beside it.

config.py       ModelConfig: the `model` section of a run config
transformer.py  RMSNorm, GQA + RoPE attention, dense/MoGE blocks, KV-cache generation
recompute.py    activation checkpointing that counts routing once
"""

from moge.model.config import ModelConfig
from moge.model.transformer import (
    IGNORE_INDEX,
    Attention,
    Block,
    KVCache,
    ModelOutput,
    MoGETransformer,
    ParamCount,
    RMSNorm,
    RotaryEmbedding,
    count_parameters,
    format_params,
    sample_next,
)

__all__ = [
    "IGNORE_INDEX",
    "Attention",
    "Block",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "MoGETransformer",
    "ParamCount",
    "RMSNorm",
    "RotaryEmbedding",
    "count_parameters",
    "format_params",
    "sample_next",
]
