import pytest
import torch
import torch.nn.functional as F
from expert_cases import LAYOUTS, assert_within_bf16_error, case, grads
from reference import reference_experts
from torch.testing import assert_close

from moge import experts as experts_module
from moge.experts import GroupedExperts, NormalLinear, SwiGLU, _loop_experts, resolve_impl, run_experts
from moge.kernels import precision


@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "loop"])
@pytest.mark.parametrize("skip", [None, 2])
def test_fast_paths_match_reference_float32(impl, skip):
    x, ids, w, experts = case(skip_expert=skip)
    experts.impl = impl
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)
    if skip is not None:  # an expert with no tokens gets an exact zero gradient
        assert fast[3][skip].abs().sum() == 0 and fast[4][skip].abs().sum() == 0


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
def test_fast_paths_match_reference_bfloat16(impl):
    """Within bf16's own error of a float32 reference (see assert_within_bf16_error)."""
    x, ids, w, experts = case(T=64, D=32, Fh=16, E=8, K=2, dtype=torch.bfloat16, seed=1)
    experts.impl = impl
    fast, exact = assert_within_bf16_error(x, ids, w, experts)
    assert fast[0].dtype == torch.bfloat16
    for a, c in zip(fast, exact):
        assert_close(a.float(), c, atol=0.03 * c.abs().max().item(), rtol=0.03)


@pytest.mark.parametrize("repeats", [1, 3])
def test_gather_rows_backward_is_the_gather_transpose(repeats):
    """_GatherRows (the sorted paths' dispatch and combine) against torch's gradcheck."""
    gen = torch.Generator().manual_seed(0)
    n = 5
    index = torch.randperm(n * repeats, generator=gen) // repeats  # every row `repeats` times
    back = torch.sort(index, stable=True).indices  # where row 0's copies went, then row 1's, ...
    src = torch.randn(n, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda s: experts_module._GatherRows.apply(s, index, back, repeats), (src,))
    assert_close(experts_module._GatherRows.apply(src, index, back, repeats), src[index])


def test_fused_backward_respects_frozen_weights():
    x, ids, w, experts = case()
    experts.w_gate_up_EDH.requires_grad_(False)
    x = x.requires_grad_()
    experts(x, ids, w).sum().backward()
    assert experts.w_gate_up_EDH.grad is None and experts.w_down_EFD.grad is not None
    assert x.grad is not None


def test_compute_dtype_argument_casts():
    x, ids, w, experts = case()
    y = experts(x, ids, w, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), experts(x, ids, w), atol=5e-2, rtol=5e-2)


def test_zero_tokens():
    _, _, _, experts = case()
    x = torch.zeros(0, 12, requires_grad=True)
    y = experts(x, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    assert y.shape == (0, 12)
    y.sum().backward()
    assert experts.w_down_EFD.grad.abs().sum() == 0


def test_swiglu_is_down_silu_gate_times_up():
    torch.manual_seed(0)
    m = SwiGLU(6, 5)
    x = torch.randn(3, 6)
    gate_w, up_w = m.w_gate_up.weight[:5], m.w_gate_up.weight[5:]
    expected = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ m.w_down.weight.T
    assert_close(m(x), expected)


def test_normal_linear_reset_draws_its_init_std_and_zero_bias():
    """What a module-by-module init loop calls: N(0, init_std) weights (not Kaiming-uniform,
    whose std at fan-in 256 is 1/sqrt(3*256) = 0.036), a zero bias."""
    lin = NormalLinear(256, 128, bias=True, init_std=0.3)
    with torch.no_grad():
        lin.weight.fill_(7)
        lin.bias.fill_(7)
    torch.manual_seed(0)
    lin.reset_parameters()
    assert abs(lin.weight.std().item() / 0.3 - 1) < 0.02  # 4 sample-std spreads: 4 / sqrt(2 * 32768)
    assert_close(lin.bias, torch.zeros(128), rtol=0, atol=0)


def test_init_std_none_keeps_nn_linears_init():
    """SwiGLU built alone (init_std None) draws what nn.Linear draws, as before."""
    torch.manual_seed(0)
    m = SwiGLU(16, 24)
    torch.manual_seed(0)
    gate_up, down = torch.nn.Linear(16, 48, bias=False), torch.nn.Linear(24, 16, bias=False)
    assert_close(m.w_gate_up.weight, gate_up.weight, rtol=0, atol=0)
    assert_close(m.w_down.weight, down.weight, rtol=0, atol=0)


def test_swiglu_and_grouped_experts_reset_with_their_stds():
    swiglu = SwiGLU(128, 256, init_std=0.3)
    swiglu.w_down.init_std = 0.1  # as a model sets its residual output projections
    experts = GroupedExperts(4, 128, 64, init_std=0.3)
    experts.down_std = 0.1
    torch.manual_seed(0)
    swiglu.reset_parameters()
    experts.reset_parameters()
    for w, std in ((swiglu.w_gate_up.weight, 0.3), (swiglu.w_down.weight, 0.1),
                   (experts.w_gate_up_EDH, 0.3), (experts.w_down_EFD, 0.1)):  # fmt: skip
        assert abs(w.std().item() / std - 1) < 4 / (2 * w.numel()) ** 0.5, (tuple(w.shape), std)
    experts.reset_parameters(0.5)  # an explicit std: both weights
    for w in (experts.w_gate_up_EDH, experts.w_down_EFD):
        assert abs(w.std().item() / 0.5 - 1) < 4 / (2 * w.numel()) ** 0.5


def test_resolve_impl():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, torch.float32) == "fused"
    cuda = torch.device("cuda")  # only the device type is read: no GPU needed
    assert (
        resolve_impl("auto", cuda, torch.bfloat16)
        == resolve_impl("auto", cuda, torch.float32)
        == "grouped_mm"
    )
    assert resolve_impl("auto", cuda, torch.float16) == "fused"
    assert resolve_impl("loop", cpu, torch.float32) == "loop"
    with pytest.raises(ValueError, match="expert_impl"):
        resolve_impl("magic", cpu, torch.float32)


@pytest.mark.parametrize("native", [False, True])
def test_swiglu_bfloat16_and_autocast_close_to_float32(monkeypatch, native):
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: native)
    torch.manual_seed(0)
    m = SwiGLU(16, 24)
    x = torch.randn(10, 16)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = m(x)
    low = m.to(torch.bfloat16)(x.bfloat16())
    for y in (auto, low):
        assert y.dtype == torch.bfloat16
        assert_close(y.float(), ref, atol=0.02 * ref.abs().max().item(), rtol=0.03)


@pytest.mark.parametrize("pad,chunk,waste", LAYOUTS)
def test_run_experts_fused_layouts_match_loop(monkeypatch, pad, chunk, waste):
    monkeypatch.setattr(experts_module, "MAX_PAD_WASTE", waste)
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([4, 0, 9, 5, 1, 7])
    S, D, Fh = int(counts.sum()), 10, 6
    x = torch.randn(S, D, generator=gen)
    w1 = torch.randn(6, D, 2 * Fh, generator=gen) * 0.3
    w2 = torch.randn(6, Fh, D, generator=gen) * 0.3
    gy = torch.randn(S, D, generator=gen)

    def grads(fn):
        xs, a, b = (t.clone().requires_grad_() for t in (x, w1, w2))
        y = fn(xs, a, b)
        (y * gy).sum().backward()
        return y.detach(), xs.grad, a.grad, b.grad

    fused = grads(lambda x, a, b: run_experts(x, a, b, counts, "fused", pad, chunk))
    loop = grads(lambda x, a, b: _loop_experts(x, a, b, counts.tolist()))
    for p, q in zip(fused, loop):
        assert_close(p, q)
    assert fused[2][1].abs().sum() == 0  # expert 1 got no slot


@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "loop"])
@pytest.mark.parametrize("grad", [True, False])
def test_autocast_without_dtype_computes_in_autocasts_dtype(impl, grad):
    """Called under autocast without `dtype`, every path (and, without gradients, the
    few-token one) computes in autocast's dtype, as the layer asks and as the reference
    loop's plain ops do: the same as passing it. The fused and few-token paths used x's
    float32 there, and grouped_mm mixed bf16 and float32."""
    x, ids, w, experts = case(T=40, D=16, Fh=8, E=8, K=2)
    experts.impl = impl
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, ids, w)
    with torch.set_grad_enabled(grad):
        expected = experts(x, ids, w, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_close(y, expected, rtol=0, atol=0)


def test_grouped_mm_only_where_its_rows_are_16_byte_aligned():
    """torch._grouped_mm wants rows of a multiple of 16 bytes (on CPU and CUDA): "auto"
    keeps the fused path where d_model or expert_hidden is not a multiple of 4 float32
    (8 bf16) values, and an explicit grouped_mm there is a ValueError naming both, not
    torch's "strides should be multiple of 16 bytes" from inside the forward."""
    cuda = torch.device("cuda")  # only the device type is read: no GPU needed
    assert resolve_impl("auto", cuda, torch.float32, (12, 8)) == "grouped_mm"
    assert resolve_impl("auto", cuda, torch.bfloat16, (12, 8)) == "fused"
    assert resolve_impl("auto", cuda, torch.float32, (12, 6)) == "fused"
    assert resolve_impl("auto", cuda, torch.bfloat16, (16, 24)) == "grouped_mm"
    with pytest.raises(ValueError, match="expert_impl.*d_model=12, expert_hidden=6"):
        resolve_impl("grouped_mm", cuda, torch.float32, (12, 6))
    x, ids, w, experts = case(D=12, Fh=6)
    experts.impl = "grouped_mm"
    with pytest.raises(ValueError, match="expert_impl.*multiples of 4 in float32"):
        experts(x, ids, w)
    counts = torch.tensor([2, 0, 3])
    with pytest.raises(ValueError, match="expert_impl.*multiples of 8 in bfloat16"):
        run_experts(torch.randn(5, 16).bfloat16(), torch.randn(3, 16, 24).bfloat16(),
                    torch.randn(3, 12, 16).bfloat16(), counts, "grouped_mm")  # fmt: skip
    experts.impl = "fused"  # the other paths take any size
    fused = experts(x, ids, w)
    experts.impl = "loop"
    assert_close(fused, experts(x, ids, w))
