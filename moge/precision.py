"""Which dtype the expert products run in on this device.

Legend: none (no tensors here, only dtypes and devices).
"""

from __future__ import annotations

import functools

import torch

# bf16 matmuls on CPUs with AMX are reported to build a kernel per new row count;
# rounding every expert's rows up to a multiple of this keeps a few shapes there. Not
# on AVX512-BF16 without AMX: on the AMD EPYC of docs/performance.md a first call at a
# new row count cost the same as a repeat, and padding to 128 made the whole layer
# ~7% slower (the extra rows are real work), so there rows are not padded.
PAD_ROWS_NATIVE_LOW_PRECISION = 128


@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    mkldnn = torch.ops.mkldnn
    if dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(mkldnn._is_mkldnn_fp16_supported())
    return True


@functools.cache
def _cpu_has_amx() -> bool:
    """AMX tiles in /proc/cpuinfo's flags; True where that cannot be read (pad to be safe)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_tile" in line.split() for line in f)
    except OSError:
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


def default_pad_rows(device: torch.device, dtype: torch.dtype) -> int:
    """Row multiple for per-expert products: 128 for native low-precision CPU kernels
    on an AMX CPU, else 1."""
    low = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cpu" and low and matmul_dtype(device, dtype) == dtype and _cpu_has_amx():
        return PAD_ROWS_NATIVE_LOW_PRECISION
    return 1


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
