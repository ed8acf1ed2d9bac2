import pytest
import torch
from expert_cases import case
from reference import reference_experts
from torch.testing import assert_close

from moge.kernels import few_tokens
from moge.kernels.few_tokens import few_token_experts, use_few_token_path
from moge.layer import MoGEConfig, MoGELayer


@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("skip_expert", [None, 2])
def test_matches_the_reference_loop_float32(T, skip_expert):
    x, ids, w, experts = case(T=T, E=6, K=3, skip_expert=skip_expert)
    with torch.no_grad():
        ref = reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD)
        assert_close(few_token_experts(experts, x, ids, w, torch.float32), ref, rtol=1e-5, atol=1e-6)


def test_no_tokens_give_an_empty_output():
    # An expert-parallel rank whose tokens are all padding calls the experts with T = 0.
    x, ids, w, experts = case(T=4, E=6, K=3)
    with torch.no_grad():
        y = few_token_experts(experts, x[:0], ids[:0], w[:0], torch.float32)
    assert y.shape == (0, x.shape[1]) and y.dtype == torch.float32


def test_bf16_within_the_bf16_reference_error():
    x, ids, w, experts = case(T=16, E=6, K=3)
    with torch.no_grad():
        exact = reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD)
        experts.bfloat16()
        xb = x.bfloat16()
        ref = reference_experts(xb, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD)
        ours = few_token_experts(experts, xb, ids, w, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    err_ours, err_ref = ((t.float() - exact).abs().max().item() for t in (ours, ref))
    scale = exact.abs().max().item()
    assert err_ours <= 2 * err_ref + 1e-3 * scale, (err_ours, err_ref)


@pytest.mark.parametrize("skip_expert", [None, 2])
def test_every_expert_on_every_token_is_within_the_bf16_reference_error(skip_expert):
    # Called directly, so it runs on a CPU without native bf16 products too (slowly).
    x, ids, w, experts = case(T=16, E=6, K=3, skip_expert=skip_expert)
    with torch.no_grad():
        exact = reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD)
        experts.bfloat16()
        xb = x.bfloat16()
        ref = reference_experts(xb, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD)
        ours = few_tokens._every_expert(experts, xb, ids, w)
    assert ours.dtype == torch.bfloat16
    err_ours, err_ref = ((t.float() - exact).abs().max().item() for t in (ours, ref))
    scale = exact.abs().max().item()
    assert err_ours <= 2 * err_ref + 1e-3 * scale, (err_ours, err_ref)


def test_every_expert_runs_where_bf16_is_native_and_most_experts_have_slots(monkeypatch):
    monkeypatch.setattr(few_tokens, "matmul_dtype", lambda device, dtype: dtype)  # as on AVX512-BF16
    x, ids, w, experts = case(T=16, E=16, K=4)
    experts.bfloat16()
    xb = x.bfloat16()
    assert few_tokens._every_expert_wins(experts, xb, ids, torch.bfloat16)
    assert few_tokens._every_expert_wins(experts, xb[:2], ids[:2], torch.bfloat16)  # 8 slots of 16
    assert not few_tokens._every_expert_wins(experts, xb[:1], ids[:1], torch.bfloat16)  # 4 of 16
    assert not few_tokens._every_expert_wins(experts, x, ids, torch.bfloat16)  # float32 input: casts
    x64, ids64, _, experts64 = case(T=16, E=64, K=8)
    experts64.bfloat16()
    assert not few_tokens._every_expert_wins(experts64, x64.bfloat16(), ids64, torch.bfloat16)  # E/K = 8
    monkeypatch.setattr(few_tokens, "matmul_dtype", lambda device, dtype: torch.float32)  # no bf16 units
    assert not few_tokens._every_expert_wins(experts, xb, ids, torch.bfloat16)
    experts.float()
    assert not few_tokens._every_expert_wins(experts, x, ids, torch.float32)


def test_float32_weights_under_bf16_autocast_compute_in_bf16():
    # The layer passes autocast's dtype: weights and input are rounded to it first.
    x, ids, w, experts = case(T=4, E=6, K=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = few_token_experts(experts, x, ids, w, torch.bfloat16)
    with torch.no_grad():
        b1, b2 = experts.w_gate_up_EDH.bfloat16(), experts.w_down_EFD.bfloat16()
        ref = reference_experts(x.bfloat16(), ids, w, b1, b2)
    assert ours.dtype == torch.bfloat16
    assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def _layer() -> MoGELayer:
    torch.manual_seed(0)
    layer = MoGELayer(MoGEConfig(d_model=16, num_experts=8, num_groups=2, top_k=2, expert_hidden=8))
    layer.experts.reset_parameters(0.3)
    return layer


def test_layer_takes_the_path_only_without_a_graph(monkeypatch):
    layer = _layer()
    calls = []
    real = few_tokens.few_token_experts

    def spy(*args):
        calls.append(args[1].shape[0])
        return real(*args)

    monkeypatch.setattr("moge.experts.few_token_experts", spy)
    x = torch.randn(3, 16)
    with torch.no_grad():
        fast = layer(x).hidden
    assert calls == [3]
    slow = layer(x).hidden  # training-style call: weights need gradients, the fused path
    assert calls == [3]
    assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
    big = torch.randn(few_tokens.MAX_FEW_SLOTS // 2 + 1, 16)  # K=2: just over the slot limit
    with torch.no_grad():
        layer(big)
    assert calls == [3]


def test_use_few_token_path_refuses_other_experts_and_devices():
    layer = _layer()
    x, ids, w = torch.randn(2, 16), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2)
    with torch.no_grad():
        assert use_few_token_path(layer.experts, x, ids, w)
        assert not use_few_token_path(torch.nn.Linear(2, 2), x, ids, w)  # e.g. expert-parallel experts
        assert not use_few_token_path(layer.experts, x.to("meta"), ids, w)
    assert not use_few_token_path(layer.experts, x, ids, w)  # grad mode, parameters need grad
