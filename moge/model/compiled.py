"""torch.compile for the attention half of every block, as an option (train.compile).

Legend: B batch, L sequence length, D d_model.

What is compiled: Block.attention_half, x + attn(attn_norm(x)) and the ffn_norm after it,
the same code for a MoE block and a dense one, so a model and its dense twin gain alike.
The FFN stays eager: the MoE layer's fused path plans on the host every call (its
per-expert row counts), which would break any graph. One compiled graph serves every
block (the layer index is not read without a KV cache), for training steps only: a
forward with a KV cache, in eval mode, without gradients or with check_finite runs
eagerly (moge.model.transformer.Block.forward).

Robust: `compile_attention` runs one forward and backward of the compiled function on a
probe of the training shape before any step. Where torch.compile fails (no C++
compiler, an unsupported op, a backend error) it warns with the reason and leaves the
model eager; `strict=True` raises instead. The probe's gradients are discarded.
"""

from __future__ import annotations

import warnings

import torch

from moge.model.transformer import Block, MoGETransformer, RotaryEmbedding


class CompileWarning(UserWarning):
    """torch.compile failed; the model runs eagerly (the message says why)."""


def _attention_half(
    block: Block, x_BLD: torch.Tensor, rope: RotaryEmbedding
) -> tuple[torch.Tensor, torch.Tensor]:
    return block.attention_half(x_BLD, rope, None)


def _probe(model: MoGETransformer, fn, shape: tuple[int, int], dtype: torch.dtype | None) -> None:
    """One compiled forward + backward through the first block at the training shape."""
    B, L = shape
    device = model.embed.weight.device
    x_BLD = torch.randn(B, L, model.cfg.d_model, device=device, requires_grad=True)
    block = model.blocks[0]
    assert isinstance(block, Block), "a MoGETransformer's blocks"
    was_training = block.training
    block.train()
    try:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y_BLD, h_BLD = fn(block, x_BLD, model.rope)
        (y_BLD.float().sum() + h_BLD.float().sum()).backward()
    finally:
        block.train(was_training)
        for p in model.parameters():
            p.grad = None


def compile_attention(
    model: MoGETransformer,
    shape: tuple[int, int],
    dtype: torch.dtype | None = None,
    strict: bool = False,
) -> str | None:
    """Compile every block's attention half of `model` (in place) for batches of `shape`
    [B, L] under autocast to `dtype` (None: none). Returns None, or why it failed (the
    model then stays eager; strict: raise RuntimeError instead). The first call, the
    probe, compiles: tens of seconds on a small CPU."""
    compiled = torch.compile(_attention_half, dynamic=False)
    try:
        _probe(model, compiled, shape, dtype)
    except Exception as err:  # any backend or tracing failure: the eager path still works
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if strict:
            raise RuntimeError(f"train.compile: torch.compile failed ({reason})") from err
        warnings.warn(
            f"train.compile: torch.compile failed ({reason}); the model runs eagerly",
            CompileWarning,
            stacklevel=2,
        )
        return reason
    for block in model.blocks:
        assert isinstance(block, Block), "a MoGETransformer's blocks"
        block.compiled_attention = compiled
    return None
