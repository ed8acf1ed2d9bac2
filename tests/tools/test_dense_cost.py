import pytest
import torch

from moge.layer import MoGEConfig, MoGELayer
from moge.tools.dense_cost import DenseCostExperts, with_dense_cost_experts

D, F, E, M, K, T = 32, 16, 8, 2, 2, 24


def _layer() -> MoGELayer:
    torch.manual_seed(0)
    return MoGELayer(
        MoGEConfig(d_model=D, num_experts=E, num_groups=M, top_k=K, expert_hidden=F, init_std=0.2)
    )


def test_the_stand_in_is_a_dense_swiglu_of_the_activated_width_on_every_token():
    layer = _layer()
    routed = layer.experts
    assert with_dense_cost_experts(layer, init_std=0.2) == 1
    stand_in = layer.experts
    assert isinstance(stand_in, DenseCostExperts) and stand_in.routed is routed
    assert stand_in.dense.hidden == K * F
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = layer(x_TD)
    # The routing is ignored: the routed part is the dense SwiGLU of x, whatever the gates.
    x_ref = x_TD.detach().clone().requires_grad_()
    torch.testing.assert_close(out.hidden, stand_in.dense(x_ref), rtol=0, atol=0)
    g_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    out.hidden.backward(g_TD)
    stand_in.dense(x_ref).backward(g_TD)
    assert x_TD.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x_TD.grad, x_ref.grad, rtol=0, atol=0)
    # The replaced experts' weights get gradients (zeros of their size): AdamW and clip
    # then see every parameter the real model trains.
    for p in routed.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    assert (
        stand_in.dense.w_gate_up.weight.grad is not None
        and stand_in.dense.w_gate_up.weight.grad.abs().sum() > 0
    )


def test_the_gates_get_a_zero_gradient_so_the_router_backward_runs():
    layer = _layer()
    with_dense_cost_experts(layer, init_std=0.2)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    out = layer(x_TD)
    weights_TK = out.weights
    weights_TK.retain_grad()
    out.hidden.sum().backward()
    assert weights_TK.grad is not None and weights_TK.grad.shape == (T, K) and not weights_TK.grad.any()
    # Only the output was differentiated: the router's backward ran, through the gates alone.
    grad = layer.router.weight.grad
    assert grad is not None and not grad.any()


def test_the_stand_in_keeps_the_layers_dtype_check():
    layer = _layer()
    with_dense_cost_experts(layer, init_std=0.2)
    with pytest.raises(ValueError, match="differs from the layer's parameters"):
        layer(torch.randn(T, D, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(T, D)).hidden.dtype == torch.bfloat16
