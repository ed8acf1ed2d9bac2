"""The activation part of `moge plan`: what one device holds for one micro-batch.

Legend: T tokens per device (micro-batch x data.seq_len), D d_model, H/G query/KV heads,
C head dim, HC = H*C, L data.seq_len, E experts, K top_k, F expert hidden, S shared
hidden, Fd dense hidden, V vocabulary.

Counted by hand from what each op of moge's model saves for backward, in two kinds:
float32 elements (RMSNorm's internals, the residual stream, the router, log-softmax)
and elements in the compute dtype (train.dtype: under bfloat16 autocast every matmul
input is a bf16 copy, and so is every weight a block multiplies with). The kernels
change what is saved, so the count follows the path moge takes for the device and
dtype: torch's attention kernel (saves q, k, v, the output and a log-sum-exp) or moge's
bf16 CPU attention (saves the probabilities, H*L per token); the fused expert kernel
(saves the gate/up activations, 2F per slot, and silu(gate), F more, where
the products run in the storage dtype) or the autograd path of grouped_mm/loop
(x, gate/up, SiLU, product and output per slot); expert parallelism (x and y per slot
too). The peak comes in backward: with everything still held, the loss's gradient
w.r.t. the logits (two [T, V] float32 tensors, then the LM head's weight gradient);
with activation checkpointing, one block recomputed with its weight copies (or its
largest weight gradient). tests/tools/test_plan_activations.py checks the total against
the CPU allocator's peak over a forward and backward, within 15%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moge.distributed.expert_parallel import EXPERT_KEYS
from moge.experts import resolve_impl
from moge.kernels.precision import default_pad_rows, matmul_dtype
from moge.kernels.sdpa import MAX_SCORES
from moge.model import MoGETransformer
from moge.model.config import ModelConfig
from moge.training.config import RunConfig

F32 = 4


@dataclass(frozen=True)
class Paths:
    """The code paths whose saved tensors differ (module docstring)."""

    attention: str  # "torch" (torch's kernel) or "math" (moge.kernels.sdpa's bf16 CPU path)
    experts: str  # "fused" or "autograd" (grouped_mm / loop)
    expert_parallel: bool  # routed experts on their ranks (moge.distributed.expert_parallel)
    low: int  # bytes per element of the compute dtype; 4: no autocast copies
    saved_silu: bool = False  # the fused kernel also keeps silu(gate) (products in the storage dtype)
    padded_rows: float = 1.0  # the fused kernel's rows per slot (each expert's rows padded up)


@dataclass(frozen=True)
class Kept:
    """Elements per token: float32 ones and ones in the compute dtype."""

    f32: int = 0
    low: int = 0

    def __add__(self, other: Kept) -> Kept:
        return Kept(self.f32 + other.f32, self.low + other.low)

    def nbytes(self, tokens: int, paths: Paths) -> int:
        return tokens * (self.f32 * F32 + self.low * paths.low)


def _norm_and_input(m: ModelConfig, consumers: int, paths: Paths) -> Kept:
    """RMSNorm (input, rsqrt, normalised: float32) and its output as `consumers` matmuls
    keep it: once in float32, or a copy each under autocast."""
    cast = paths.low != F32
    return Kept(f32=2 * m.d_model + 1 + (0 if cast else m.d_model), low=consumers * m.d_model if cast else 0)


def attention(m: ModelConfig, seq_len: int, paths: Paths) -> Kept:
    """Norm, q/k/v inputs, then q (H heads), k and v (N heads: moge.kernels.sdpa makes no
    repeated copy), the output, and the kernel's own: a log-sum-exp per head (torch) or
    the probabilities (math, H*L)."""
    C = m.resolved_head_dim
    kept = _norm_and_input(m, 3, paths) + Kept(low=2 * (m.n_heads + m.n_kv_heads) * C)
    if m.qk_norm:  # each head's q and k normalised in float32: input, rsqrt, output
        kept += Kept(f32=(2 * C + 1) * (m.n_heads + m.n_kv_heads))
    if paths.attention == "math":
        return kept + Kept(low=m.n_heads * seq_len)
    return kept + Kept(f32=m.n_heads)


def moe_ffn(cfg: RunConfig, paths: Paths) -> Kept:
    """Norm; router (float32: its input, logits, scores, the ids and gates of K slots);
    routed experts by path; the shared experts (gate/up, SiLU, product)."""
    m, e = cfg.model, cfg.moe
    D, K, F = m.d_model, e.top_k, e.expert_hidden
    cast = paths.low != F32
    kept = _norm_and_input(m, 0, paths) + Kept(f32=(D if cast else 0) + 2 * e.num_experts + 6 * K + 1)
    fused = round((3 if paths.saved_silu else 2) * F * paths.padded_rows)  # gate/up (and silu(gate)) per row
    if paths.expert_parallel:  # slots gathered, sent, received: x and y per slot kept
        routed = K * (2 * D + (fused if paths.experts == "fused" else 4 * F))
    elif paths.experts == "fused":  # the input copy and the gate/up activations of every slot
        routed = (D if cast else 0) + K * fused
    else:
        routed = K * (2 * D + 4 * F)
    kept += Kept(low=routed)
    if e.shared_width:
        kept += Kept(low=(D if cast else 0) + 4 * e.shared_width + (1 if e.shared_expert_gate else 0))
    return kept


def dense_ffn(m: ModelConfig, paths: Paths) -> Kept:
    """Norm, the input, then gate/up, SiLU and product (Fd each but gate/up: 2 Fd)."""
    return _norm_and_input(m, 1, paths) + Kept(low=4 * m.resolved_dense_hidden)


def head(m: ModelConfig, paths: Paths) -> Kept:
    """Final norm and the LM head's input; the logits (held by the output) in the compute
    dtype and log-softmax in float32; token ids and targets (int64)."""
    return _norm_and_input(m, 1, paths) + Kept(f32=m.vocab_size + 4, low=m.vocab_size)


def paths_for(cfg: RunConfig, device: str, dtype: str, micro_batch: int, expert_parallel: bool) -> Paths:
    """The paths moge takes for `device` ("cpu" or "cuda") and the compute `dtype`."""
    dev, torch_dtype = torch.device(device), getattr(torch, dtype)
    m, L = cfg.model, cfg.data.seq_len
    low = torch_dtype in (torch.bfloat16, torch.float16)
    small = micro_batch * m.n_heads * L * L <= MAX_SCORES  # moge.kernels.sdpa's own condition
    impl = resolve_impl(cfg.moe.expert_impl, dev, torch_dtype)
    return Paths(
        attention="math" if dev.type == "cpu" and low and small else "torch",
        experts="fused" if impl == "fused" else "autograd",
        expert_parallel=expert_parallel,
        low=torch_dtype.itemsize,
        # moge.kernels.fused saves silu(gate) where the products run in the storage dtype.
        saved_silu=impl == "fused" and matmul_dtype(dev, torch_dtype) == torch_dtype,
        padded_rows=_padded_rows(cfg, dev, torch_dtype, micro_batch) if impl == "fused" else 1.0,
    )


def _padded_rows(cfg: RunConfig, dev: torch.device, dtype: torch.dtype, micro_batch: int) -> float:
    """Rows per slot of the fused kernel at an even load: native bf16 CPU products pad each
    expert's rows up to a multiple of default_pad_rows (up to 2x at a few rows each)."""
    e = cfg.moe
    rows = micro_batch * cfg.data.seq_len * e.top_k / e.num_experts  # per expert
    pad = default_pad_rows(dev, dtype, rows)
    return math.ceil(rows / pad) * pad / rows


@dataclass(frozen=True)
class Weights:
    """Elements of the weights as the blocks multiply with them (unsharded; this device's
    experts), for the copies autocast keeps and the weight gradients of backward."""

    casts: list[int]  # per block: the matrices autocast copies and autograd keeps
    head: int  # the LM head's matrix (tied: the embedding)
    largest: int  # the largest matrix of a block: its gradient passes backward through its cast


def weights_used(model: MoGETransformer, ep: int, paths: Paths) -> Weights:
    """Weights of `model` (built on meta) on a device of an ep-wide expert group.

    Every matrix but the router (float32) is cast; the fused kernel casts the experts
    inside, keeping the float32 ones, except under expert parallelism."""
    casts: list[int] = []
    largest = 0
    for block in model.blocks:
        n = 0
        for name, p in block.named_parameters():
            expert = name.endswith(EXPERT_KEYS)
            numel = p.numel() // ep if expert else p.numel()
            if p.dim() >= 2:
                largest = max(largest, numel)
            if p.dim() >= 2 and not name.endswith("router.weight"):
                n += 0 if expert and paths.experts == "fused" and not paths.expert_parallel else numel
        casts.append(n)
    cfg = model.cfg
    return Weights(casts, int(cfg.vocab_size * cfg.d_model), largest)


@dataclass(frozen=True)
class Activations:
    """Bytes one device holds for one micro-batch: `held` from the end of forward into
    backward (every block's kept tensors, or with checkpointing each block's input),
    and the most backward adds on top (`backward`); their sum is the peak."""

    held: int
    backward: int

    @property
    def peak(self) -> int:
        return self.held + self.backward


def activations(
    cfg: RunConfig, micro_batch: int, paths: Paths, checkpointing: bool, weights: Weights
) -> Activations:
    """The activation bytes of `cfg` (module docstring); the weight copies count only
    when the compute dtype is 16-bit."""
    m = cfg.model
    T = micro_batch * cfg.data.seq_len
    cast = paths.low if paths.low != F32 else 0
    tokens = []  # per block: what its tokens keep
    for i in range(m.n_layers):
        ffn = moe_ffn(cfg, paths) if m.is_moe_layer(i) else dense_ffn(m, paths)
        tokens.append((attention(m, cfg.data.seq_len, paths) + ffn).nbytes(T, paths))
    top = head(m, paths).nbytes(T, paths) + weights.head * cast
    # Backward starts at the loss: d(log-softmax) and d(logits) in float32, then d(logits)
    # in the compute dtype while the LM head's weight gradient forms in it and in float32.
    logits_grad = max(
        2 * T * m.vocab_size * F32, T * m.vocab_size * (cast or F32) + weights.head * (cast + F32)
    )
    weight_grad = weights.largest * (cast + F32)  # a block's largest, in the compute dtype, then float32
    if checkpointing:  # block inputs (float32 residual stream) and the MoE layers' routing
        # outputs (scores, ids, gates); in backward the logits' gradient, then one block
        # recomputed at a time: its tokens' tensors and its weight copies, which backward
        # frees as it makes their gradients
        moe = sum(map(m.is_moe_layer, range(m.n_layers)))
        routing = (cfg.moe.num_experts + 3 * cfg.moe.top_k) * F32 * T * moe
        held = T * m.d_model * F32 * m.n_layers + routing + top
        block = max(t + max(c * cast, weight_grad) for t, c in zip(tokens, weights.casts))
        return Activations(held=held, backward=max(block, logits_grad))
    held = sum(tokens) + sum(weights.casts) * cast + top
    return Activations(held=held, backward=max(logits_grad, weight_grad))
