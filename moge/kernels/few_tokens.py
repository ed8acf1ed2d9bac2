"""The routed experts for a few tokens without gradients: decoding's one token per
sequence per step.

Legend: T tokens, K experts per token, S = T*K token-slots (sorted by expert),
D d_model, F expert hidden, H = 2F, E experts.

The fused path (moge/kernels/fused.py) plans chunks, token blocks, scratch buffers and
padding so that training-size calls run near the dense limit; for T*K slots in the tens
that planning is most of the call (measured ~290 us of a 430 us layer call at T=1,
d=128, E=16, K=4, one thread). Here each expert that received slots runs one product
per projection on a view of its stacked weights, and the slots are added back with one
index_add_: no weight is copied and idle experts cost nothing. Same maths as the
reference loop (tests/reference.py), forward only.

Where bf16 products are native and most experts receive slots (decoding a batch at the
toy configs' E = 4K), every expert instead runs on every token, one bmm per projection
in bf16, and the gates (0 for the experts a token did not choose) weigh the sum: E/K
times the products, but two calls instead of two per expert and no float32 copies of
the weights (`_every_expert`; measured below).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import Tensor

from moge.kernels.fused_plan import expert_slices
from moge.kernels.precision import matmul_dtype


class StackedExperts(Protocol):
    """What this path reads of moge.experts.GroupedExperts (which calls it)."""

    @property
    def w_gate_up_EDH(self) -> Tensor: ...
    @property
    def w_down_EFD(self) -> Tensor: ...
    @property
    def hidden(self) -> int: ...
    @property
    def num_experts(self) -> int: ...


# Calls with at most this many token-slots (T*K) and no gradient take this path: it
# measured faster than the fused path up to a few hundred slots at the toy shapes
# (docs/performance.md); decoding batch 16 with K=4 is 64.
MAX_FEW_SLOTS = 128


def records_graph(*inputs: Tensor) -> bool:
    """Whether autograd records a call on these inputs (a fused Function cannot tell from
    inside: there grad mode is always off, and needs_input_grad ignores torch.no_grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def use_few_token_path(experts: object, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> bool:
    """Whether this call should take `few_token_experts`: plain (not sharded) stacked
    experts (moge.experts.GroupedExperts, which asks) on the CPU, no autograd graph to
    build, at most MAX_FEW_SLOTS slots."""
    w1, w2 = getattr(experts, "w_gate_up_EDH", None), getattr(experts, "w_down_EFD", None)
    if w1 is None or w2 is None or x_TD.device.type != "cpu":
        return False  # CUDA: torch._grouped_mm is one kernel
    if type(w1.data) is not torch.Tensor or type(w2.data) is not torch.Tensor:
        return False  # DTensor shards (FSDP2)
    return not records_graph(x_TD, weights_TK, w1, w2) and ids_TK.numel() <= MAX_FEW_SLOTS


# `_every_expert` runs when E <= EVERY_EXPERT_MAX_E_PER_K * K and 2 * T * K >= E (about
# half the experts or more receive slots) with native bf16 products and bf16 weights.
# AVX512-BF16, one thread, bf16 weights, E=16 K=4, us per call against the per-expert
# path: d=f=256 T=2 205/245, T=16 404/921; d=f=128 T=16 155/430; but at E=64 K=8
# (d=512 f=256) T=16 7,809/5,672: there the E/K = 8 times the products cost more.
EVERY_EXPERT_MAX_E_PER_K = 4


def _every_expert_wins(experts: StackedExperts, x_TD: Tensor, ids_TK: Tensor, dtype: torch.dtype) -> bool:
    """Whether `_every_expert` is the faster way for this call (the constant above)."""
    T, K = ids_TK.shape
    E = experts.num_experts
    w1, w2 = experts.w_gate_up_EDH, experts.w_down_EFD
    native = dtype in (torch.bfloat16, torch.float16) and matmul_dtype(x_TD.device, dtype) == dtype
    stored = x_TD.dtype == w1.dtype == w2.dtype == dtype  # no weight casts
    return native and stored and E <= EVERY_EXPERT_MAX_E_PER_K * K and 2 * T * K >= E


def _every_expert(experts: StackedExperts, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """y_t = sum_e gate[t, e] * expert_e(x_t) with gate = weights at the chosen experts, 0
    elsewhere: every expert on every token, products in x's dtype, the weighted sum in
    float32, rounded once. x_TD [T, D] in the weights' dtype -> y_TD [T, D]."""
    E, F = experts.num_experts, experts.hidden
    T, D = x_TD.shape
    w1, w2 = experts.w_gate_up_EDH.detach(), experts.w_down_EFD.detach()
    gate_TE = weights_TK.new_zeros(T, E, dtype=torch.float32).scatter_(1, ids_TK, weights_TK.float())
    h_ETH = torch.bmm(x_TD.detach().expand(E, T, D), w1)
    a_ETF = F_.silu(h_ETH[..., :F]) * h_ETH[..., F:]
    y_ETD = torch.bmm(a_ETF, w2)
    y_TD = torch.einsum("etd,et->td", y_ETD.float(), rearrange(gate_TE, "t e -> e t"))
    return y_TD.to(x_TD.dtype)


def few_token_experts(
    experts: StackedExperts, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, dtype: torch.dtype
) -> Tensor:
    """y_t = sum_k weights[t, k] * expert_{ids[t, k]}(x_t), computed in `dtype`, no graph.

    x_TD [T, D], ids_TK [T, K] int64, weights_TK [T, K] -> y_TD [T, D] in `dtype`; bf16 and
    fp16 products run in float32 on operands rounded to `dtype`, outputs rounded back.
    """
    if torch.is_autocast_enabled(x_TD.device.type):  # every cast below is explicit
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return _few_token_experts(experts, x_TD, ids_TK, weights_TK, dtype)
    return _few_token_experts(experts, x_TD, ids_TK, weights_TK, dtype)


def _few_token_experts(
    experts: StackedExperts, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, dtype: torch.dtype
) -> Tensor:
    if _every_expert_wins(experts, x_TD, ids_TK, dtype):
        return _every_expert(experts, x_TD, ids_TK, weights_TK)
    T, K = ids_TK.shape
    F = experts.hidden
    # Products in float32 on operands rounded to `dtype` (what a bf16 kernel accumulating in
    # float32 computes): at a few rows torch's CPU bf16 matmul costs more than the up-cast
    # and a float32 one (19 against 12-14 us for [1-4, 128] @ [128, 256], AVX512-BF16).
    mm = torch.float32 if dtype in (torch.bfloat16, torch.float16) else matmul_dtype(x_TD.device, dtype)
    w1, w2 = experts.w_gate_up_EDH.detach(), experts.w_down_EFD.detach()
    # At these sizes every call counts: casts only where a dtype differs (each is a no-op
    # call otherwise, and there are four per expert).
    plain = x_TD.dtype == dtype == mm == w1.dtype == w2.dtype

    def prod(t: Tensor) -> Tensor:  # a weight slice or activation, as the product reads it
        return t if plain else t.to(dtype).to(mm)

    # A few dozen ids: sorting and counting them in Python costs less than the tensor
    # ops that would do it (argsort, bincount, tolist).
    flat = ids_TK.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=flat.__getitem__)  # stable: token order per expert
    counts = [0] * experts.num_experts
    for e in flat:
        counts[e] += 1
    order_S = torch.tensor(order, dtype=torch.int64, device=x_TD.device)
    token_S = torch.tensor([s // K for s in order], dtype=torch.int64, device=x_TD.device)
    rows = list(expert_slices(counts))
    x_SD = prod(x_TD.detach().index_select(0, token_S))
    h_SH = x_SD.new_empty(x_SD.shape[0], 2 * F)
    for e, r in rows:
        torch.mm(x_SD[r], prod(w1[e]), out=h_SH[r])
    gate_SF, up_SF = h_SH[:, :F], h_SH[:, F:]
    if not plain:  # rounded to the compute dtype between the products, as a kernel in dtype
        gate_SF, up_SF = gate_SF.to(dtype), up_SF.to(dtype)
    a_SF = prod(F_.silu(gate_SF) * up_SF)
    y_SD = a_SF.new_empty(a_SF.shape[0], x_TD.shape[1])
    for e, r in rows:
        torch.mm(a_SF[r], prod(w2[e]), out=y_SD[r])
    gate_S1 = weights_TK.detach().reshape(-1).index_select(0, order_S)[:, None]
    y_SD = y_SD.to(dtype) * gate_S1.to(dtype)
    return y_SD.new_zeros(T, x_TD.shape[1]).index_add_(0, token_S, y_SD)
