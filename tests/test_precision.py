import torch

from moge import precision
from moge.precision import default_pad_rows, matmul_dtype


def test_matmul_dtype_upcasts_only_low_precision_without_native_support(monkeypatch):
    cpu = torch.device("cpu")
    assert matmul_dtype(cpu, torch.float32) == torch.float32
    assert matmul_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
    assert matmul_dtype(cpu, torch.bfloat16) == torch.float32
    assert default_pad_rows(cpu, torch.bfloat16) == 1 and default_pad_rows(cpu, torch.float32) == 1
