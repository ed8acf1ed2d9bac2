"""Which dtype the expert products run in on this device.

Legend: none (no tensors here, only dtypes and devices).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# bf16 matmuls on CPUs with native support (oneDNN kernels for AVX512-BF16 or AMX) build
# a kernel per new shape: measured ~0.45 ms for a first call at a new row count against
# 0.05 ms for a repeat ([256, 128] @ [128, 256], AMD EPYC with AVX512-BF16), and the
# kernel cache holds ~1k shapes. Rounding every expert's rows up to a multiple keeps
# about a hundred shapes per layer; the multiple scales with the rows an expert gets
# (about 1/PAD_ROWS_FRACTION of them, so padding adds ~1%), between these bounds.
# 1/16 (~3% extra rows) measured 1.22 against 1.18 the dense limit for 1/64 at the
# default benchmark shape (1,024 rows per expert: pad 64 against 16), bf16, one thread.
PAD_ROWS_NATIVE_LOW_PRECISION = 128
MIN_PAD_ROWS_NATIVE_LOW_PRECISION = 16
PAD_ROWS_FRACTION = 64
# A native bf16 mm call (oneDNN) costs a fixed ~15-20 us beyond its work: four mm of
# [256, 128] @ [128, 256] took 0.41 ms against 0.34 ms for one bmm of the same four,
# one thread, AMD EPYC with AVX512-BF16 (~200 GFLOP/s there); float32 mm (MKL) showed
# no such cost (0.687 against 0.669 ms). In flops of the same kernel:
MM_CALL_FLOPS_NATIVE_LOW_PRECISION = 17e-6 * 2e11
# With AMX (Intel Xeon, amx_bf16) an extra mm call against one bmm costs 15-25 MFLOP
# of the bmm's own speed (27-52 us at 340-730 GFLOP/s, [256..512, 128] @ [128, 128..256],
# one thread; scripts/measure_bmm_call_cost.py): ~5x the flops above. With this cost
# the layer measured 1-7% faster there than with the one above (docs/performance.md).
MM_CALL_FLOPS_AMX = 50e-6 * 3.4e11


@functools.cache
def _cpu_has_amx() -> bool:
    """Whether torch's CPU kernels can use AMX tiles (private torch API; False without it)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    mkldnn = torch.ops.mkldnn
    if dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(mkldnn._is_mkldnn_fp16_supported())
    return True


_forced_float32 = False  # inside float32_products(): see there


@contextlib.contextmanager
def float32_products() -> Iterator[None]:
    """Inside: bf16/fp16 products on CPU run in float32 on up-cast operands, as on a
    CPU without bf16 matrix instructions, so that a benchmark (or test) measures that
    path on a CPU that has them. Not thread-safe; not for training code."""
    global _forced_float32
    saved, _forced_float32 = _forced_float32, True
    try:
        yield
    finally:
        _forced_float32 = saved


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the expert products run in for tensors stored in `dtype`.

    A CPU without bf16/fp16 matrix instructions falls back to a scalar loop in
    torch (measured 10-90x slower than float32 here, depending on the layout), so
    there the products run in float32 on up-cast operands: the same maths as a bf16
    kernel that accumulates in float32, with storage and outputs still in `dtype`.
    """
    low = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cpu" and low and (_forced_float32 or not _cpu_has_native(dtype)):
        return torch.float32
    return dtype


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes x's products in: its dtype where it is on for x's device
    and x is of a dtype it casts (float32, float16, bfloat16: float64 it leaves alone, as
    torch's own ops do), else x's own."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def default_pad_rows(device: torch.device, dtype: torch.dtype, rows_per_expert: float | None = None) -> int:
    """Row multiple for per-expert products: for native low-precision CPU kernels a power
    of two near rows_per_expert / PAD_ROWS_FRACTION in 16..128 (128 when not given), else 1."""
    low = dtype in (torch.bfloat16, torch.float16)
    if not (device.type == "cpu" and low and matmul_dtype(device, dtype) == dtype):
        return 1
    if rows_per_expert is None:
        return PAD_ROWS_NATIVE_LOW_PRECISION
    pad = MIN_PAD_ROWS_NATIVE_LOW_PRECISION
    while pad * 2 <= min(rows_per_expert / PAD_ROWS_FRACTION, PAD_ROWS_NATIVE_LOW_PRECISION):
        pad *= 2
    return pad


def combine_by_index_add(device: torch.device) -> bool:
    """Whether the fused combine adds every group after the first by token with one
    index_add_ (see fused._Combine) rather than by gathers into a buffer and an add_.

    On CPU, where index_add_ adds in order: 0.89-0.99x the layer's time on an Intel
    Xeon with AMX (bf16 and fp32), 0.995-1.008x on an AMD EPYC with AVX512-BF16 (bf16,
    T=1024-4096), side by side. Not on CUDA, where index_add_ adds in a
    nondeterministic order unless torch.use_deterministic_algorithms is on; the
    gathers give the same sums in the same order on every run.
    """
    return device.type == "cpu"


def mm_call_rows(device: torch.device, dtype: torch.dtype, flops_per_row: float) -> float:
    """The fixed cost of one expert product call in rows of its work (flops_per_row
    flops each): where it is large, one bmm over padded rows beats one mm per expert
    (fused_plan.Plan). 0 where the products are float32 (no measurable call cost)."""
    if dtype not in (torch.bfloat16, torch.float16) or default_pad_rows(device, dtype) == 1:
        return 0.0
    amx = dtype == torch.bfloat16 and _cpu_has_amx()
    call_flops = MM_CALL_FLOPS_AMX if amx else MM_CALL_FLOPS_NATIVE_LOW_PRECISION
    return call_flops / max(flops_per_row, 1.0)


# Rows per block of the float32 router (for inputs of another dtype): its float32
# copies of x and of dx ([block, D]) stay in cache instead of being written to memory
# whole ([T, D] float32, twice the bf16 input): 4.5 against 3.1 ms for the backward at
# T=4096 D=512 E=16, one thread, caches flushed (AMD EPYC with AVX512-BF16); in the
# layer the forward's whole-x cast alone took 2.6 ms there. On CUDA one block (one
# launch per product): there the per-block launches, not the copy, would cost.
ROUTER_BLOCK_ROWS = 512


def _router_block_rows(x_TD: torch.Tensor) -> int:
    return ROUTER_BLOCK_ROWS if x_TD.device.type == "cpu" else max(x_TD.shape[0], 1)


def _bf16_gradient_products(x_TD: torch.Tensor, w_ED: torch.Tensor) -> bool:
    """Whether the float32 router's backward runs its two products in bf16: x and w both
    bf16 (exact in bf16, so only the logits' gradient is rounded, to bf16's 8 bits with
    float32's range), on a device with native bf16 products."""
    bf16 = torch.bfloat16
    return x_TD.dtype == bf16 and w_ED.dtype == bf16 and matmul_dtype(x_TD.device, bf16) == bf16


class _Float32Linear(torch.autograd.Function):
    """x @ w.T in float32 for x, w of any float dtype; saves x and w as they are.

    The logits are float32 (they choose the experts). Their backward gives gradients in x's
    and w's dtypes; where both are bf16 and bf16 products are native it computes them as
    bf16 products (accumulating in float32) of the logits' gradient rounded to bf16, as any
    bf16 linear's backward does: measured 0.41 against 1.83 ms at T=4096 D=512 E=16 (one
    thread, AMD EPYC with AVX512-BF16), with errors 1.2-1.5x the bf16 rounding of the
    gradients themselves (max relative to their scale: dx 3.5e-3 against 2.4e-3, dw 2.9e-3
    against 2.2e-3). Elsewhere they come from float32 products in row blocks.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        w_DE = w_ED.float().T
        logits_TE = x_TD.new_empty(x_TD.shape[0], w_ED.shape[0], dtype=torch.float32)
        rows = _router_block_rows(x_TD)
        for t0 in range(0, x_TD.shape[0], rows):
            x_BD = x_TD[t0 : t0 + rows]
            torch.mm(x_BD.float(), w_DE, out=logits_TE[t0 : t0 + x_BD.shape[0]])
        return logits_TE

    @staticmethod
    def backward(ctx, g_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if _bf16_gradient_products(x_TD, w_ED):
            # A backward may run inside an autocast region (of fp16, say): these stay bf16.
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                g16_TE = g_TE.to(torch.bfloat16)
                return (g16_TE @ w_ED if need_x else None), (g16_TE.T @ x_TD if need_w else None)
        g_TE, w_f = g_TE.float(), w_ED.float()
        dx = torch.empty_like(x_TD) if need_x else None
        dw = torch.zeros_like(w_f) if need_w else None
        rows = _router_block_rows(x_TD)
        dx_block = x_TD.new_empty(min(rows, x_TD.shape[0]), x_TD.shape[1], dtype=torch.float32)
        for t0 in range(0, x_TD.shape[0], rows):
            g_BE = g_TE[t0 : t0 + rows]
            if dx is not None:
                dx[t0 : t0 + rows].copy_(torch.mm(g_BE, w_f, out=dx_block[: g_BE.shape[0]]))
            if dw is not None:
                dw.addmm_(g_BE.T, x_TD[t0 : t0 + rows].float())
        return dx, None if dw is None else dw.to(w_ED.dtype)


def float32_linear(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """F.linear(x.float(), w.float()) (router logits) without keeping a float32 copy of x
    for backward: a bf16 x [T, D] would otherwise be saved twice, once as a float32
    copy twice its size. x_TD [T, D], w_ED [E, D] -> [T, E] float32 (autocast off);
    float64 when x or w is (never less precise than the input: a float64 layer stays
    float64 end to end, so torch.autograd.gradcheck can check it)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        if torch.float64 in (x_TD.dtype, w_ED.dtype):
            return torch.nn.functional.linear(x_TD.double(), w_ED.double())
        if x_TD.dtype == torch.float32 and w_ED.dtype == torch.float32:
            return torch.nn.functional.linear(x_TD, w_ED)
        return _Float32Linear.apply(x_TD, w_ED)
