import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moge.experts import GroupedExperts, SwiGLU, resolve_impl
from reference import reference_experts


def _case(T=29, D=12, Fh=8, E=6, K=3, seed=0, dtype=torch.float32, skip_expert=None):
    torch.manual_seed(seed)  # for the weight init
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen).to(dtype)
    if skip_expert is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).reshape(T, K)
    else:  # draw from the other E-1 experts, so `skip_expert` gets no token
        ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)]).reshape(T, K)
        ids = ids + (ids >= skip_expert).long()
    w = torch.rand(T, K, generator=gen)
    experts = GroupedExperts(E, D, Fh)
    experts.reset_parameters(0.3)
    experts.to(dtype)
    return x, ids, w, experts


def _grads(fn, x, w, experts):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    experts.zero_grad()
    y = fn(x, w)
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    (y * gy).sum().backward()
    return y.detach(), x.grad, w.grad, experts.w_gate_up_EDH.grad.clone(), experts.w_down_EFD.grad.clone()


@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "loop"])
@pytest.mark.parametrize("skip", [None, 2])
def test_fast_paths_match_reference_float32(impl, skip):
    x, ids, w, experts = _case(skip_expert=skip)
    experts.impl = impl
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)
    if skip is not None:  # an expert with no tokens gets an exact zero gradient
        assert fast[3][skip].abs().sum() == 0 and fast[4][skip].abs().sum() == 0


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
def test_fast_paths_match_reference_bfloat16(impl):
    """bf16 rounding differs between any two orderings of the same maths, so (as in
    FlashAttention's tests) the fast path's error against a float32 run of the
    reference must stay within twice the bf16 reference's own error."""
    x, ids, w, experts = _case(T=64, D=32, Fh=16, E=8, K=2, dtype=torch.bfloat16, seed=1)
    experts.impl = impl
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    experts.float()
    exact = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD),
        x.float(), w, experts,
    )  # fmt: skip
    assert fast[0].dtype == torch.bfloat16
    for name, a, b, c in zip(("y", "dx", "dw", "dw1", "dw2"), fast, ref, exact):
        err_fast = (a.float() - c).abs().max().item()
        err_ref = (b.float() - c).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-3, (name, err_fast, err_ref)
        assert_close(a.float(), c, atol=0.03 * c.abs().max().item(), rtol=0.03)


def test_fused_backward_respects_frozen_weights():
    x, ids, w, experts = _case()
    experts.w_gate_up_EDH.requires_grad_(False)
    x = x.requires_grad_()
    experts(x, ids, w).sum().backward()
    assert experts.w_gate_up_EDH.grad is None and experts.w_down_EFD.grad is not None
    assert x.grad is not None


def test_compute_dtype_argument_casts():
    x, ids, w, experts = _case()
    y = experts(x, ids, w, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), experts(x, ids, w), atol=5e-2, rtol=5e-2)


def test_zero_tokens():
    _, _, _, experts = _case()
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


def test_resolve_impl():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, torch.float32) == "fused"
    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "grouped_mm"
    assert resolve_impl("loop", cpu, torch.float32) == "loop"
    with pytest.raises(ValueError, match="expert_impl"):
        resolve_impl("magic", cpu, torch.float32)
