import pytest
import torch
from torch.testing import assert_close

from moge.experts import GroupedExperts
from moge.kernels import precision
from moge.kernels.precision import default_pad_rows, float32_linear, matmul_dtype


def test_matmul_dtype_upcasts_only_low_precision_without_native_support(monkeypatch):
    cpu = torch.device("cpu")
    assert matmul_dtype(cpu, torch.float32) == torch.float32
    assert matmul_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
    assert matmul_dtype(cpu, torch.bfloat16) == torch.float32
    assert default_pad_rows(cpu, torch.bfloat16) == 1 and default_pad_rows(cpu, torch.float32) == 1


def _linear_and_grads(x, w, gy):
    """float32_linear(x, w) under bf16 autocast (which must not change it), and (dx, dw)."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = float32_linear(x, w)
    y.backward(gy)
    return y, x.grad, w.grad


def _float32_copies(x, w, gy):
    x, w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = torch.nn.functional.linear(x, w)
    y.backward(gy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("native", [True, False])
def test_float32_linear_matches_linear_of_float32_copies(monkeypatch, native):
    """Logits equal float32 products of float32 copies on either kind of CPU. Gradients too
    where float32 products make them (a bf16 x beside a float32 w, or no native bf16); for
    bf16 x and w on a CPU with native bf16 they come from bf16 products of the rounded
    logits' gradient: each error (relative to the gradient's scale) at most 2x that of
    rounding the exact gradient to bf16."""
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: native)
    gen = torch.Generator().manual_seed(0)
    bf16, f32 = torch.bfloat16, torch.float32
    for x_dtype, w_dtype in ((bf16, f32), (bf16, bf16)):
        x = torch.randn(64, 48, generator=gen).to(x_dtype)
        w = torch.randn(8, 48, generator=gen).to(w_dtype)
        gy = torch.randn(64, 8, generator=gen)
        y, dx, dw = _linear_and_grads(x, w, gy)
        y2, dx2, dw2 = _float32_copies(x, w, gy)
        assert y.dtype == f32 and dx.dtype == x_dtype and dw.dtype == w_dtype
        assert_close(y, y2)
        if native and w_dtype == bf16:
            for got, exact in ((dx, dx2), (dw, dw2)):
                scale = exact.abs().max()
                rounding = (exact.to(bf16).float() - exact).abs().max() / scale
                err = (got.float() - exact).abs().max() / scale
                assert 0 < err <= 2 * rounding, (err, rounding)
        else:
            assert_close(dx, dx2.to(x_dtype))
            assert_close(dw, dw2.to(w_dtype))


def test_float32_linear_rounds_the_gradient_only_for_bf16_products(monkeypatch):
    """With native bf16 the bf16 gradients are exactly bf16 products of bf16(g); without it
    they are the float32 products' gradients rounded once."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 8, generator=gen).bfloat16()
    w = torch.randn(4, 8, generator=gen).bfloat16()
    gy = torch.randn(16, 4, generator=gen)
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    _, dx, dw = _linear_and_grads(x, w, gy)
    assert torch.equal(dx, gy.bfloat16() @ w) and torch.equal(dw, gy.bfloat16().T @ x)
    # A backward inside an fp16 autocast region (the forward outside it) changes nothing.
    x2 = x.clone().requires_grad_()
    y = float32_linear(x2, w)
    with torch.autocast("cpu", dtype=torch.float16):
        y.backward(gy)
    assert torch.equal(x2.grad, dx)
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
    _, dx, dw = _linear_and_grads(x, w, gy)
    assert torch.equal(dx, (gy @ w.float()).bfloat16()) and torch.equal(dw, (gy.T @ x.float()).bfloat16())


def test_float32_linear_in_row_blocks_matches_one_product(monkeypatch):
    """Blocks of 3 rows over 8 (a short last block): the same logits and gradients (the
    float32 products' backward: bf16 products off)."""
    monkeypatch.setattr(precision, "ROUTER_BLOCK_ROWS", 3)
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
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
    monkeypatch.setattr(precision, "_cpu_has_amx", lambda: False)
    rows = precision.mm_call_rows(cpu, torch.bfloat16, 1000.0)
    assert rows == precision.MM_CALL_FLOPS_NATIVE_LOW_PRECISION / 1000.0 > 0
    assert precision.mm_call_rows(cpu, torch.bfloat16, 2000.0) == rows / 2  # in rows of that work
    assert precision.mm_call_rows(cpu, torch.float32, 1000.0) == 0.0
    # AMX: a call costs more of the (faster) kernel's work; bf16 only (AMX-BF16).
    monkeypatch.setattr(precision, "_cpu_has_amx", lambda: True)
    assert precision.mm_call_rows(cpu, torch.bfloat16, 1000.0) == precision.MM_CALL_FLOPS_AMX / 1000.0 > rows
    assert precision.mm_call_rows(cpu, torch.float16, 1000.0) == rows
    assert precision.mm_call_rows(cpu, torch.float32, 1000.0) == 0.0
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
    assert precision.mm_call_rows(cpu, torch.bfloat16, 1000.0) == 0.0


def test_amx_call_cost_makes_an_uneven_group_one_bmm(monkeypatch):
    """Group 0's experts get 700, 400, 500 and 448 of T=2048 tokens (d=f=128, rows padded
    to 16): a bmm adds 752 rows. At the AVX512-BF16 call cost the three mm calls it
    saves are worth ~207 rows (one mm per expert); at the AMX one ~1,038 (one bmm)."""
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    T, E, K = 2048, 16, 4
    first = torch.tensor([0] * 700 + [1] * 400 + [2] * 500 + [3] * 448)
    ids = torch.stack([first] + [4 * g + torch.arange(T) % 4 for g in (1, 2, 3)], dim=1)
    experts = GroupedExperts(E, 128, 128)
    experts.experts_per_chunk = E // K

    def group0_cap(amx: bool):
        monkeypatch.setattr(precision, "_cpu_has_amx", lambda: amx)
        plan = experts._fused_plan(ids, 128, torch.device("cpu"), torch.bfloat16)[1]
        assert plan.chunks[0].e0 == 0 and plan.chunks[1].cap == 512  # even groups: a bmm either way
        return plan.chunks[0].cap

    assert group0_cap(False) is None
    assert group0_cap(True) == 704


def test_combine_adds_by_index_on_cpu_not_on_cuda():
    """The later groups' combine by index_add_ on CPU (in order), by gathers on CUDA
    (index_add_'s order is not deterministic there); combine_index_add overrides it."""
    cpu = torch.device("cpu")
    assert precision.combine_by_index_add(cpu) is True
    assert precision.combine_by_index_add(torch.device("cuda")) is False  # (a device object only)
    ids = torch.stack([torch.arange(64) % 4, 4 + torch.arange(64) % 4], dim=1)  # E=8, M=2, K=2
    experts = GroupedExperts(8, 16, 8)
    experts.experts_per_chunk = 4
    assert experts._fused_plan(ids, 16, cpu, torch.float32)[1].combine_index_add is True
    experts.combine_index_add = False
    assert experts._fused_plan(ids, 16, cpu, torch.float32)[1].combine_index_add is False
