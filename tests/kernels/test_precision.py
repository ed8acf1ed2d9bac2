import torch
from torch.testing import assert_close

from moge.kernels import precision
from moge.kernels.precision import default_pad_rows, float32_linear, matmul_dtype


def test_matmul_dtype_upcasts_only_low_precision_without_native_support(monkeypatch):
    cpu = torch.device("cpu")
    assert matmul_dtype(cpu, torch.float32) == torch.float32
    assert matmul_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
    assert matmul_dtype(cpu, torch.bfloat16) == torch.float32
    assert default_pad_rows(cpu, torch.bfloat16) == 1 and default_pad_rows(cpu, torch.float32) == 1


def test_float32_linear_matches_linear_of_float32_copies():
    gen = torch.Generator().manual_seed(0)
    for x_dtype, w_dtype in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        x = torch.randn(7, 5, generator=gen).to(x_dtype).requires_grad_()
        w = torch.randn(3, 5, generator=gen).to(w_dtype).requires_grad_()
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # must not change the result
            y = float32_linear(x, w)
        y2 = torch.nn.functional.linear(x2.float(), w2.float())
        assert y.dtype == torch.float32
        assert_close(y, y2)
        gy = torch.randn(7, 3, generator=gen)
        y.backward(gy)
        y2.backward(gy)
        assert x.grad.dtype == x_dtype and w.grad.dtype == w_dtype
        assert_close(x.grad, x2.grad)
        assert_close(w.grad, w2.grad)
