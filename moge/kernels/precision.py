"""Which dtype the expert products run in on this device.

Legend: none (no tensors here, only dtypes and devices).
"""

from __future__ import annotations

import functools

import torch

# bf16 matmuls on CPUs with native support (oneDNN kernels for AVX512-BF16 or AMX) build
# a kernel per new shape: measured ~0.45 ms for a first call at a new row count against
# 0.05 ms for a repeat ([256, 128] @ [128, 256], AMD EPYC with AVX512-BF16), and the
# kernel cache holds ~1k shapes. Rounding every expert's rows up to a multiple keeps a
# few dozen shapes per layer; the multiple scales with the rows an expert gets (about
# 1/16 of them, so padding adds ~3%), between these bounds.
PAD_ROWS_NATIVE_LOW_PRECISION = 128
MIN_PAD_ROWS_NATIVE_LOW_PRECISION = 16


@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    mkldnn = torch.ops.mkldnn
    if dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(mkldnn._is_mkldnn_fp16_supported())
    return True


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the expert products run in for tensors stored in `dtype`.

    A CPU without bf16/fp16 matrix instructions falls back to a scalar loop in
    torch (measured 10-90x slower than float32 here, depending on the layout), so
    there the products run in float32 on up-cast operands: the same maths as a bf16
    kernel that accumulates in float32, with storage and outputs still in `dtype`.
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_has_native(dtype):
        return torch.float32
    return dtype


def default_pad_rows(device: torch.device, dtype: torch.dtype, rows_per_expert: float | None = None) -> int:
    """Row multiple for per-expert products: for native low-precision CPU kernels a power
    of two near rows_per_expert / 16 in 16..128 (128 when not given), else 1."""
    low = dtype in (torch.bfloat16, torch.float16)
    if not (device.type == "cpu" and low and matmul_dtype(device, dtype) == dtype):
        return 1
    if rows_per_expert is None:
        return PAD_ROWS_NATIVE_LOW_PRECISION
    pad = MIN_PAD_ROWS_NATIVE_LOW_PRECISION
    while pad * 2 <= min(rows_per_expert / 16, PAD_ROWS_NATIVE_LOW_PRECISION):
        pad *= 2
    return pad


class _Float32Linear(torch.autograd.Function):
    """x @ w.T in float32 for x, w of any float dtype; saves x and w as they are."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return x_TD.float() @ w_ED.float().T

    @staticmethod
    def backward(ctx, g_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        g_TE = g_TE.float()
        dx = (g_TE @ w_ED.float()).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
        dw = (g_TE.T @ x_TD.float()).to(w_ED.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def float32_linear(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """F.linear(x.float(), w.float()) (router logits) without keeping a float32 copy of x
    for backward: a bf16 x [T, D] would otherwise be saved twice, once as a float32
    copy twice its size. x_TD [T, D], w_ED [E, D] -> [T, E] float32 (autocast off)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        if x_TD.dtype == torch.float32 and w_ED.dtype == torch.float32:
            return torch.nn.functional.linear(x_TD, w_ED)
        return _Float32Linear.apply(x_TD, w_ED)
