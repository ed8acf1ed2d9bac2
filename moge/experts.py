"""SwiGLU experts: a dense one, and E routed ones stored as stacked weight tensors.

Legend: T tokens, K experts per token, S = T*K token-slots (sorted by expert),
D d_model, F expert hidden, H = 2F (gate and up projections, fused), E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import Tensor, nn

EXPERT_IMPLS = ("auto", "fused", "grouped_mm", "loop")


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN, no bias: down(silu(gate(x)) * up(x)), gate and up fused.

    Used for the shared experts (added unweighted) and for dense blocks.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]."""
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F_.silu(gate) * up)


# --- the fused path: per-expert matmuls inside one autograd Function ---------------


def _slices(counts: list[int]):
    """(expert, row slice) for every expert that received token-slots."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


class _FusedSwiGLUExperts(torch.autograd.Function):
    """Runs each expert's SwiGLU on its contiguous block of sorted slots.

    The hand-written backward writes each expert's gradient slice in place; autograd
    through per-expert slicing instead materialises a full-size zero gradient for
    every expert, which costs as much as the matmuls at large E.
    """

    @staticmethod
    def forward(ctx, x_SD: Tensor, w_gate_up_EDH: Tensor, w_down_EFD: Tensor, counts: list[int]) -> Tensor:
        assert sum(counts) == x_SD.shape[0], "counts must cover every slot"
        F = w_down_EFD.shape[1]
        h_SH = x_SD.new_empty(x_SD.shape[0], 2 * F)
        y_SD = x_SD.new_empty(x_SD.shape[0], w_down_EFD.shape[2])
        for e, rows in _slices(counts):
            torch.mm(x_SD[rows], w_gate_up_EDH[e], out=h_SH[rows])
            act = F_.silu(h_SH[rows, :F]) * h_SH[rows, F:]
            torch.mm(act, w_down_EFD[e], out=y_SD[rows])
        ctx.save_for_backward(x_SD, w_gate_up_EDH, w_down_EFD, h_SH)
        ctx.counts = counts
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: Tensor):
        x_SD, w_gate_up_EDH, w_down_EFD, h_SH = ctx.saved_tensors
        F = w_down_EFD.shape[1]
        dy_SD = dy_SD.contiguous()
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dx_SD = torch.empty_like(x_SD) if need_x else None
        # Experts that got no slots still need a (zero) gradient.
        dw1 = torch.zeros_like(w_gate_up_EDH) if need_w1 else None
        dw2 = torch.zeros_like(w_down_EFD) if need_w2 else None
        for e, rows in _slices(ctx.counts):
            gate, up = h_SH[rows, :F], h_SH[rows, F:]
            sig = torch.sigmoid(gate)
            silu = gate * sig
            dact = dy_SD[rows] @ w_down_EFD[e].T
            if need_w2:
                torch.mm((silu * up).T, dy_SD[rows], out=dw2[e])
            dh = torch.cat((dact * up * (sig + silu * (1 - sig)), dact * silu), dim=1)
            if need_x:
                torch.mm(dh, w_gate_up_EDH[e].T, out=dx_SD[rows])
            if need_w1:
                torch.mm(x_SD[rows].T, dh, out=dw1[e])
        return dx_SD, dw1, dw2, None


# --- other paths ---------------------------------------------------------------------


def _loop_experts(x_SD: Tensor, w1: Tensor, w2: Tensor, counts: list[int]) -> Tensor:
    """The plain per-expert loop through autograd: correct, simple, slow backward."""
    F = w2.shape[1]
    outs = []
    for e, rows in _slices(counts):
        gate, up = (x_SD[rows] @ w1[e]).split(F, dim=-1)
        outs.append((F_.silu(gate) * up) @ w2[e])
    return torch.cat(outs) if outs else x_SD.new_zeros(0, w2.shape[2])


def _grouped_mm_experts(x_SD: Tensor, w1: Tensor, w2: Tensor, counts_E: Tensor) -> Tensor:
    """Two calls of torch._grouped_mm (one kernel each on CUDA; a loop inside torch on CPU)."""
    offs = counts_E.cumsum(0).to(torch.int32)
    F = w2.shape[1]
    h_SH = torch._grouped_mm(x_SD, w1, offs=offs)
    act = F_.silu(h_SH[:, :F]) * h_SH[:, F:]
    return torch._grouped_mm(act, w2, offs=offs)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": grouped_mm on CUDA in bf16 (a real grouped kernel), else the fused path."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl: expected one of {', '.join(EXPERT_IMPLS)}; got {impl!r}")
    if impl != "auto":
        return impl
    if device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        return "grouped_mm"
    return "fused"


def run_experts(x_SD: Tensor, w1: Tensor, w2: Tensor, counts_E: Tensor, impl: str) -> Tensor:
    """Each expert's SwiGLU on its block of sorted slots. x_SD [S, D] -> [S, D]."""
    impl = resolve_impl(impl, x_SD.device, x_SD.dtype)
    if impl == "grouped_mm":
        return _grouped_mm_experts(x_SD, w1, w2, counts_E)
    counts = counts_E.tolist()
    if impl == "loop":
        return _loop_experts(x_SD, w1, w2, counts)
    return _FusedSwiGLUExperts.apply(x_SD, w1, w2, counts)


# --- the module ----------------------------------------------------------------------


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked tensors, with sort-based dispatch and combine.

    w_gate_up_EDH [E, D, 2F] (gate columns first, then up), w_down_EFD [E, F, D].
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, impl: str = "auto") -> None:
        super().__init__()
        resolve_impl(impl, torch.device("cpu"), torch.float32)  # validates the name
        self.num_experts, self.d_model, self.hidden, self.impl = num_experts, d_model, hidden, impl
        self.w_gate_up_EDH = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.w_gate_up_EDH, std=std)
        nn.init.normal_(self.w_down_EFD, std=std)

    @property
    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.hidden

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """y_t = sum_k weights[t, k] * expert_{ids[t, k]}(x_t).

        x_TD [T, D], ids_TK [T, K] int64, weights_TK [T, K] -> y_TD [T, D] in `dtype`
        (the compute dtype; default x's). Slots are sorted by expert id (stable), run
        as one grouped product, then gathered back to token order and combined.
        """
        dtype = dtype or x_TD.dtype
        T, K = ids_TK.shape
        flat_S = ids_TK.reshape(-1)
        order_S = flat_S.argsort(stable=True)
        counts_E = torch.bincount(flat_S, minlength=self.num_experts)
        x_SD = x_TD.to(dtype).index_select(0, order_S // K)
        w1, w2 = self.w_gate_up_EDH.to(dtype), self.w_down_EFD.to(dtype)
        y_SD = run_experts(x_SD, w1, w2, counts_E, self.impl)
        # Back to token order: sorted slot s is flat slot order_S[s], so invert the permutation.
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_TKD = rearrange(y_SD.index_select(0, inverse_S), "(t k) d -> t k d", k=K)
        return torch.einsum("tk,tkd->td", weights_TK.to(dtype), y_TKD)

