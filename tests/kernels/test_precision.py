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


def test_float32_linear_in_row_blocks_matches_one_product(monkeypatch):
    """Blocks of 3 rows over 8 (a short last block): the same logits and gradients."""
    monkeypatch.setattr(precision, "ROUTER_BLOCK_ROWS", 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(4, 5, generator=gen).bfloat16().requires_grad_()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y, y2 = float32_linear(x, w), torch.nn.functional.linear(x2.float(), w2.float())
    assert_close(y, y2)
    gy = torch.randn(8, 4, generator=gen)
    y.backward(gy)
    y2.backward(gy)
    assert_close(x.grad, x2.grad)
    assert_close(w.grad, w2.grad)
    # Only one of the two gradients asked for: the other is not computed.
    x3 = x.detach().clone().requires_grad_()
    float32_linear(x3, w.detach()).backward(gy)
    assert_close(x3.grad, x2.grad)


def test_float32_products_forces_the_float32_path_inside_only(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    cpu = torch.device("cpu")
    assert matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16
    with precision.float32_products():
        with precision.float32_products():  # nested: the outer one still holds after
            pass
        assert matmul_dtype(cpu, torch.bfloat16) == torch.float32
        assert default_pad_rows(cpu, torch.bfloat16, 1024) == 1
        assert precision.mm_call_rows(cpu, torch.bfloat16, 1000.0) == 0.0
    assert matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16
    try:
        with precision.float32_products():
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16  # restored after an error too


def test_mm_call_rows_only_where_native_low_precision_calls_cost(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    rows = precision.mm_call_rows(cpu, torch.bfloat16, 1000.0)
    assert rows == precision.MM_CALL_FLOPS_NATIVE_LOW_PRECISION / 1000.0 > 0
    assert precision.mm_call_rows(cpu, torch.bfloat16, 2000.0) == rows / 2  # in rows of that work
    assert precision.mm_call_rows(cpu, torch.float32, 1000.0) == 0.0
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
    assert precision.mm_call_rows(cpu, torch.bfloat16, 1000.0) == 0.0
