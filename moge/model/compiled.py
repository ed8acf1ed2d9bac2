"""torch.compile for the attention half of every block and the FFNs' elementwise work,
as an option (train.compile).

Legend: B batch, L sequence length, D d_model, T tokens, E experts, K experts per token.

What is compiled: Block.attention_half, x + attn(attn_norm(x)) and the ffn_norm after it,
the same code for a MoE block and a dense one, so a model and its dense twin gain alike.
One compiled graph serves every block (the layer index is not read without a KV cache),
for training steps only: a forward with a KV cache, in eval mode, without gradients or
with check_finite runs eagerly (moge.model.transformer.Block.forward).

The FFNs' products, routing and planning stay eager: the MoE layer's fused path plans
on the host every call (its per-expert row counts), which would break any graph. Only
their elementwise work is compiled (`compile_ffn`): silu(gate) * up of every dense
SwiGLU (dense blocks, shared experts; SwiGLU.compiled_act, training steps only) and the
fused path's forward and backward elementwise passes (GroupedExperts.compile_elementwise:
one kernel each way instead of three and seven passes). Both kinds of FFN gain, so the
MoE model and its dense twin are compared like for like.

Robust: `compile_attention` runs one forward and backward of the compiled function on a
probe of the training shape before any step. Where torch.compile fails (no C++
compiler, an unsupported op, a backend error) it warns with the reason and leaves the
model eager; `strict=True` raises instead. The probe's gradients are discarded.
"""

from __future__ import annotations

import warnings

import torch

from moge.experts import SwiGLU, swiglu_act
from moge.layer import MoGELayer
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


def _failed(err: Exception, strict: bool, what: str) -> str:
    """The one-line reason of a torch.compile failure; warns (or raises, strict)."""
    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if strict:
        raise RuntimeError(f"train.compile: torch.compile failed ({reason})") from err
    warnings.warn(
        f"train.compile: torch.compile of {what} failed ({reason}); it runs eagerly",
        CompileWarning,
        stacklevel=3,
    )
    return reason


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
        return _failed(err, strict, "the attention halves")
    for block in model.blocks:
        assert isinstance(block, Block), "a MoGETransformer's blocks"
        block.compiled_attention = compiled
    return None


def _ffns(model: MoGETransformer) -> tuple[list[MoGELayer], list[SwiGLU]]:
    """The model's MoE layers and its dense SwiGLUs (dense blocks and shared experts)."""
    layers = [m for m in model.modules() if isinstance(m, MoGELayer)]
    dense = [m for m in model.modules() if isinstance(m, SwiGLU)]
    return layers, dense


def _set_ffn(model: MoGETransformer, act) -> None:
    """Turn the FFNs' compiled elementwise work on (act: the compiled swiglu_act) or off (None)."""
    layers, dense = _ffns(model)
    for layer in layers:
        layer.experts.compile_elementwise = act is not None
    for ffn in dense:
        ffn.compiled_act = act


def _probe_ffn(model: MoGETransformer, tokens: int, dtype: torch.dtype | None) -> None:
    """One forward + backward of the first MoE layer's routed experts (random routing:
    no balance counts move) and of the first dense SwiGLU, on `tokens` rows."""
    layers, dense = _ffns(model)
    device = model.embed.weight.device
    D = model.cfg.d_model
    try:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for layer in layers[:1]:
                E, K = layer.config.num_experts, layer.config.top_k
                x_TD = torch.randn(tokens, D, device=device, requires_grad=True)
                ids_TK = torch.rand(tokens, E, device=device).topk(K, dim=1).indices
                weights_TK = torch.rand(tokens, K, device=device, requires_grad=True)
                y_TD = layer.experts(x_TD, ids_TK, weights_TK, dtype)
                y_TD.float().sum().backward()
            for ffn in dense[:1]:
                was_training = ffn.training
                ffn.train()
                x_TD = torch.randn(tokens, D, device=device, requires_grad=True)
                try:
                    ffn(x_TD).float().sum().backward()
                finally:
                    ffn.train(was_training)
    finally:
        for p in model.parameters():
            p.grad = None


def compile_ffn(
    model: MoGETransformer,
    shape: tuple[int, int],
    dtype: torch.dtype | None = None,
    strict: bool = False,
) -> str | None:
    """Compile the elementwise work of every FFN of `model` (in place; module docstring)
    for batches of `shape` [B, L] under autocast to `dtype` (None: none). Returns None,
    or why it failed (the FFNs then stay eager; strict: raise RuntimeError instead).
    A probe forward and backward compiles before any step."""
    _set_ffn(model, torch.compile(swiglu_act, dynamic=True))
    try:
        _probe_ffn(model, shape[0] * shape[1], dtype)
    except Exception as err:  # as compile_attention: the eager path still works
        _set_ffn(model, None)
        return _failed(err, strict, "the FFNs' elementwise work")
    return None


def compile_model(
    model: MoGETransformer,
    shape: tuple[int, int],
    dtype: torch.dtype | None = None,
    strict: bool = False,
) -> str | None:
    """train.compile: compile_attention, then compile_ffn; each part that fails stays
    eager on its own. Returns None, or the reasons of the parts that failed."""
    reasons = [compile_attention(model, shape, dtype, strict), compile_ffn(model, shape, dtype, strict)]
    failed = [r for r in reasons if r is not None]
    return "; ".join(failed) if failed else None
