"""Which dtype the expert products run in on this device.

Legend: none (no tensors here, only dtypes and devices).
"""

from __future__ import annotations

import functools

import torch

# bf16 matmuls on CPUs with native support (AMX, AVX512-BF16) build a kernel per new
# row count; rounding every expert's rows up to a multiple of this keeps a few shapes.
PAD_ROWS_NATIVE_LOW_PRECISION = 128


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


def default_pad_rows(device: torch.device, dtype: torch.dtype) -> int:
    """Row multiple for per-expert products: 128 for native low-precision CPU kernels, else 1."""
    low = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cpu" and low and matmul_dtype(device, dtype) == dtype:
        return PAD_ROWS_NATIVE_LOW_PRECISION
    return 1
