"""SwiGLU experts: a dense one, and E routed ones stored as stacked weight tensors.

Legend: T tokens, K experts per token, S = T*K token-slots (sorted by expert),
D d_model, F expert hidden, H = 2F (gate and up projections, fused), E experts.

GroupedExperts keeps the weights and picks a path: "fused" (the default on CPU;
moge/kernels/fused_plan.py + moge/kernels/fused.py: chunks of experts, scratch buffers, hand-written
backward), "grouped_mm" (torch._grouped_mm, the default on CUDA) or "loop"
(one matmul per expert through autograd). All match the reference loop in
tests/reference.py, forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import Tensor, nn

from moge.balance import count_ids
from moge.kernels.few_tokens import few_token_experts, records_graph, use_few_token_path
from moge.kernels.fused import FusedMoE, FusedSwiGLUExperts
from moge.kernels.fused_plan import (
    CHUNK_BYTES,
    MAX_PAD_WASTE,
    Plan,
    columns_per_chunk,
    default_chunk,
    expert_slices,
    sort_pieces,
    token_blocks,
)
from moge.kernels.precision import (
    combine_by_index_add,
    compute_dtype,
    default_pad_rows,
    matmul_dtype,
    mm_call_rows,
)

__all__ = [
    "EXPERT_IMPLS",
    "GroupedExperts",
    "NormalLinear",
    "SwiGLU",
    "default_pad_rows",
    "matmul_dtype",
    "resolve_impl",
    "run_experts",
    "sort_slots",
    "swiglu_act",
]

EXPERT_IMPLS = ("auto", "fused", "grouped_mm", "loop")


def _linear(x: Tensor, w: Tensor) -> Tensor:
    """F.linear that honours `matmul_dtype` (and autocast's dtype) for the product."""
    dtype = compute_dtype(x)
    mm = matmul_dtype(x.device, dtype)
    if mm == dtype:
        return F_.linear(x, w)
    with torch.autocast(device_type=x.device.type, enabled=False):
        # Round to the compute dtype first, so the result is that of a bf16 kernel.
        return F_.linear(x.to(dtype).to(mm), w.to(dtype).to(mm)).to(dtype)


def swiglu_act(h: Tensor) -> Tensor:
    """silu(gate) * up of the fused [..., 2F] projection [gate | up] -> [..., F]."""
    gate, up = h.chunk(2, dim=-1)
    return F_.silu(gate) * up


class NormalLinear(nn.Linear):
    """nn.Linear whose reset_parameters() draws weight [out, in] ~ N(0, init_std) and zeros
    the bias [out] (init_std None: nn.Linear's own init).

    Module-by-module init loops (FSDP's meta-device materialisation, `for m in
    model.modules(): m.reset_parameters()`) call every module's reset_parameters(); a plain
    nn.Linear there would redraw torch's Kaiming-uniform weights over the configured init.
    Its owner sets init_std to the std its own init uses (the layer's config, or
    MoGETransformer.init_weights' rule), so both give the same distribution.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_std: float | None = None):
        # Before nn.Linear.__init__, which calls reset_parameters().
        self.init_std = init_std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        if self.init_std is None:
            super().reset_parameters()
            return
        nn.init.normal_(self.weight, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN, no bias: down(silu(gate(x)) * up(x)), gate and up fused.

    Used for the shared experts (added unweighted) and for dense blocks. `compiled_act`
    (None: eager) is swiglu_act through torch.compile, set by moge.model.compiled for
    training steps (train.compile): used only in training mode with gradients on.
    init_std: both weights ~ N(0, init_std) (NormalLinear; None: nn.Linear's init).
    """

    def __init__(self, d_model: int, hidden: int, init_std: float | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_gate_up = NormalLinear(d_model, 2 * hidden, bias=False, init_std=init_std)
        self.w_down = NormalLinear(hidden, d_model, bias=False, init_std=init_std)
        self.compiled_act: Callable[[Tensor], Tensor] | None = None

    def reset_parameters(self) -> None:
        """Both projections again, each with its own init_std."""
        self.w_gate_up.reset_parameters()
        self.w_down.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]."""
        h = _linear(x, self.w_gate_up.weight)
        if self.compiled_act is not None and self.training and torch.is_grad_enabled():
            return _linear(self.compiled_act(h), self.w_down.weight)
        return _linear(swiglu_act(h), self.w_down.weight)


# --- other paths ---------------------------------------------------------------------


def _loop_experts(x_SD: Tensor, w1: Tensor, w2: Tensor, counts: list[int]) -> Tensor:
    """The plain per-expert loop through autograd: correct, simple, slow backward."""
    F = w2.shape[1]
    outs = []
    for e, rows in expert_slices(counts):
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


class _GatherRows(torch.autograd.Function):
    """src_ND.index_select(0, index_R) whose backward gathers too, with no atomic adds.

    index_R must take every row of src exactly `repeats` times (as a sort by expert takes
    each token's K slots), and back_R list, in src's row order, where those copies went:
    src row n's copies are at back_R[n*repeats : (n+1)*repeats]. Autograd's own backward
    (index_add_) adds with atomics on CUDA: nondeterministic, and on an H200 29% of the
    bf16 layer's device time at d=2048 E=64 K=8 (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, src_ND: Tensor, index_R: Tensor, back_R: Tensor, repeats: int) -> Tensor:
        ctx.save_for_backward(back_R)
        ctx.repeats = repeats
        return src_ND.index_select(0, index_R)

    @staticmethod
    def backward(ctx, g_RD: Tensor):
        (back_R,) = ctx.saved_tensors
        g_RD = g_RD.index_select(0, back_R)
        if ctx.repeats > 1:  # each source row's copies, summed (float32 accumulation inside sum)
            g_RD = rearrange(g_RD, "(n r) d -> n r d", r=ctx.repeats).sum(dim=1)
        return g_RD, None, None, None


def inverse_permutation(order_S: Tensor) -> Tensor:
    """inverse_S [S] with inverse_S[order_S[s]] = s: where each flat slot was sorted to."""
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return inverse_S


def combine_sorted(y_SD: Tensor, order_S: Tensor, inverse_S: Tensor, weights_TK: Tensor) -> Tensor:
    """The sorted slots' outputs back in token order, each token's K rows summed weighted
    by their gates: y_SD [S, D] (sorted slot s is flat slot order_S[s]) -> [T, D]."""
    K = weights_TK.shape[1]
    y_TKD = rearrange(_GatherRows.apply(y_SD, inverse_S, order_S, 1), "(t k) d -> t k d", k=K)
    return torch.einsum("tk,tkd->td", weights_TK.to(y_SD.dtype), y_TKD)


def _grouped_mm_rows_aligned(d_model: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm takes this layer's operands: it wants every row stride
    a multiple of 16 bytes (x [S, D], gate/up [E, D, 2F], its activations [S, F], down
    [E, F, D] and their gradients), so D and F multiples of 4 float32 or 8 bf16 values.
    Checked on CPU and CUDA alike (torch's meta registration mirrors the CUDA checks)."""
    per_row = 16 // dtype.itemsize
    return d_model % per_row == 0 and hidden % per_row == 0


def resolve_impl(
    impl: str, device: torch.device, dtype: torch.dtype, dims: tuple[int, int] | None = None
) -> str:
    """ "auto": grouped_mm on CUDA in bf16 and float32 (a real grouped kernel), else the
    fused path (built for CPUs: on an H200 it ran 1.2-2.0x slower than grouped_mm in
    float32, docs/performance.md). With dims (d_model, expert hidden): "auto" keeps the
    fused path where torch._grouped_mm would refuse their rows (_grouped_mm_rows_aligned),
    and an explicit grouped_mm there is a ValueError."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl: expected one of {', '.join(EXPERT_IMPLS)}; got {impl!r}")
    if impl == "grouped_mm" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"expert_impl: grouped_mm (torch._grouped_mm) takes float32, bfloat16 or float16 products, "
            f"not {str(dtype).removeprefix('torch.')}; use fused or loop"
        )
    aligned = dims is None or _grouped_mm_rows_aligned(*dims, dtype)
    if impl == "grouped_mm" and not aligned:
        assert dims is not None
        raise ValueError(
            f"expert_impl: grouped_mm (torch._grouped_mm) needs rows of a multiple of 16 bytes, so d_model "
            f"and expert_hidden multiples of {16 // dtype.itemsize} in {str(dtype).removeprefix('torch.')}; "
            f"got d_model={dims[0]}, expert_hidden={dims[1]}; use fused or loop"
        )
    if impl != "auto":
        return impl
    cuda_kernel = device.type == "cuda" and dtype in (torch.bfloat16, torch.float32)
    if cuda_kernel and aligned and hasattr(torch, "_grouped_mm"):
        return "grouped_mm"
    return "fused"


def run_experts(
    x_SD: Tensor, w1: Tensor, w2: Tensor, counts_E: Tensor, impl: str,
    pad_rows: int | None = None, experts_per_chunk: int | None = None,
) -> Tensor:  # fmt: skip
    """Each expert's SwiGLU on its block of sorted slots. x_SD [S, D] -> [S, D].

    Fused only: pad_rows is the row multiple of the per-expert products (None:
    `default_pad_rows` for x's device and dtype); experts_per_chunk how many
    consecutive experts share one pass of the elementwise work (None: E // 4).
    """
    impl = resolve_impl(impl, x_SD.device, x_SD.dtype, (x_SD.shape[1], w2.shape[1]))
    if impl == "grouped_mm":
        return _grouped_mm_experts(x_SD, w1, w2, counts_E)
    counts = counts_E.tolist()
    if impl == "loop":
        return _loop_experts(x_SD, w1, w2, counts)
    pad = pad_rows or default_pad_rows(x_SD.device, x_SD.dtype, x_SD.shape[0] / max(len(counts), 1))
    plan = Plan(
        counts, len(counts), pad, experts_per_chunk or default_chunk(len(counts)), MAX_PAD_WASTE, x_SD.device
    )
    plan.needs_backward = records_graph(x_SD, w1, w2)
    return FusedSwiGLUExperts.apply(x_SD, w1, w2, plan)


def sort_slots(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Token-slots grouped by expert. ids_TK [T, K] -> (order_S, counts_E).

    order_S [S] int64: the flat slot index t*K+k of the s-th sorted slot (stable, so
    within an expert slots keep token order); counts_E [E] int64 slots per expert.
    """
    flat_S = ids_TK.reshape(-1)
    return flat_S.argsort(stable=True), count_ids(flat_S, num_experts)


# --- the module ----------------------------------------------------------------------


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked tensors, with sort-based dispatch and combine.

    w_gate_up_EDH [E, D, 2F] (gate columns first, then up), w_down_EFD [E, F, D].
    Fused path knobs (plain attributes, not saved):
    - pad_rows: row multiple of the per-expert products (None: `default_pad_rows` for
      the input's device and dtype);
    - experts_per_chunk: how many consecutive experts share one pass of the gather,
      elementwise and combine work (None: E // 4; MoGELayer sets one group's experts);
    - max_pad_waste: a chunk runs as one bmm per product when equalising its experts'
      row counts adds at most this fraction of rows (default 0: one mm per expert
      unless the counts are equal; measured faster, see docs/performance.md), plus,
      with bmm_by_cost (default on), the rows that the mm calls it saves would cost
      (precision.mm_call_rows: only for native bf16 products, whose calls have a
      fixed cost that matters at the toy shapes);
    - chunk_bytes: token blocks keep a chunk's float32 work buffers near this size;
    - compile_elementwise: run the SwiGLU's elementwise work through torch.compile
      (one fused kernel each way; the first call compiles for tens of seconds);
    - combine_index_add: the groups after the first add into the combine by one
      index_add_ by token instead of gathers and an add_ (None: where
      precision.combine_by_index_add says: on CPU, not on CUDA);
    - combine_float32: where the products run in bf16 (native-bf16 CPUs), add the
      groups' outputs (and dx) in a float32 accumulator instead of bf16 (slower; by
      default they add in bf16, as the reference loop and transformers do).
    """

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, impl: str = "auto", init_std: float = 0.02
    ) -> None:
        super().__init__()
        resolve_impl(impl, torch.device("cpu"), torch.float32)  # validates the name
        self.num_experts, self.d_model, self.hidden, self.impl = num_experts, d_model, hidden, impl
        # reset_parameters()'s stds when none is given: gate/up, and down (a model gives its
        # residual output projection a smaller one, MoGETransformer.init_weights).
        self.init_std = self.down_std = init_std
        self.pad_rows: int | None = None
        self.experts_per_chunk: int | None = None
        self.max_pad_waste = MAX_PAD_WASTE
        self.bmm_by_cost = True
        self.chunk_bytes = CHUNK_BYTES
        self.compile_elementwise = False
        self.combine_float32 = False
        self.combine_index_add: bool | None = None
        self.w_gate_up_EDH = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def reset_parameters(self, std: float | None = None) -> None:
        """Weights ~ N(0, std); std None: w_gate_up_EDH ~ N(0, init_std), w_down_EFD ~
        N(0, down_std) (FSDP's meta-device materialisation and module-by-module init
        loops call reset_parameters() without arguments)."""
        nn.init.normal_(self.w_gate_up_EDH, std=self.init_std if std is None else std)
        nn.init.normal_(self.w_down_EFD, std=self.down_std if std is None else std)

    @property
    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.hidden

    def _fused_plan(self, ids_TK: Tensor, D: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """(order_S, plan, cols) of the fused path for this call's routing."""
        E = self.num_experts
        per_chunk = self.experts_per_chunk or default_chunk(E)
        T, K = ids_TK.shape
        width = max(D, 2 * self.hidden)
        block_tokens, blocks = token_blocks(T, K * per_chunk / E, width, self.chunk_bytes)
        order_S, counts = sort_pieces(ids_TK, E, per_chunk, block_tokens, blocks)
        pad = self.pad_rows or default_pad_rows(device, dtype, T * K / E)
        # The six products of a row (gate/up, down; their input and weight gradients)
        # do 18*D*F flops in six calls.
        call_rows = mm_call_rows(device, dtype, 3 * D * self.hidden) if self.bmm_by_cost else 0.0
        plan = Plan(
            counts, E, pad, per_chunk, self.max_pad_waste, device, self.compile_elementwise, blocks,
            block_tokens, call_rows,
        )  # fmt: skip
        plan.combine_float32 = self.combine_float32
        by_index = self.combine_index_add
        plan.combine_index_add = combine_by_index_add(device) if by_index is None else by_index
        return order_S, plan, columns_per_chunk(ids_TK, per_chunk, E)

    def _sorted_path(
        self, x_TD: Tensor, order_S: Tensor, counts_E: Tensor, weights_TK: Tensor, impl: str
    ) -> Tensor:
        """Gather sorted slots, run_experts, gather back to token order, weighted sum."""
        K = weights_TK.shape[1]
        dtype = x_TD.dtype
        # Sorted slot s is flat slot order_S[s] (token order_S[s] // K); inverse_S undoes it.
        inverse_S = inverse_permutation(order_S)
        x_SD = _GatherRows.apply(x_TD, order_S // K, inverse_S, K)
        w1, w2 = self.w_gate_up_EDH.to(dtype), self.w_down_EFD.to(dtype)
        y_SD = run_experts(x_SD, w1, w2, counts_E, impl, self.pad_rows, self.experts_per_chunk)
        return combine_sorted(y_SD, order_S, inverse_S, weights_TK)

    def forward(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, dtype: torch.dtype | None = None
    ) -> Tensor:
        """y_t = sum_k weights[t, k] * expert_{ids[t, k]}(x_t).

        x_TD [T, D], ids_TK [T, K] int64, weights_TK [T, K] -> y_TD [T, D] in `dtype`
        (the compute dtype; default: autocast's where it is on for x, else x's, as
        precision.compute_dtype and the layer have it). Slots are sorted by expert id (stable) and
        each expert runs on its block; "fused" does dispatch, experts and combine in
        one autograd Function with a hand-written backward.
        """
        dtype = dtype or compute_dtype(x_TD)
        if use_few_token_path(self, x_TD, ids_TK, weights_TK):  # decoding: a few slots, no graph
            return few_token_experts(self, x_TD, ids_TK, weights_TK, dtype)
        x_TD = x_TD.to(dtype)
        impl = resolve_impl(self.impl, x_TD.device, dtype, (x_TD.shape[1], self.hidden))
        if impl != "fused":
            order_S, counts_E = sort_slots(ids_TK, self.num_experts)
            return self._sorted_path(x_TD, order_S, counts_E, weights_TK, impl)
        order_S, plan, cols = self._fused_plan(ids_TK, x_TD.shape[1], x_TD.device, dtype)
        plan.needs_backward = records_graph(x_TD, weights_TK, self.w_gate_up_EDH, self.w_down_EFD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return FusedMoE.apply(x_TD, weights_TK, self.w_gate_up_EDH, self.w_down_EFD, order_S, plan, cols)
