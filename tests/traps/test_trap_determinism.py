"""Determinism: the same forward and backward twice on CPU is bit-identical.

Scatter-adds with atomics (index_add_ on CUDA) make MoE layers non-deterministic; on
CPU every expert path and router must give the same bits twice: outputs, losses,
every gradient, the load counts and the bias after end_step.
"""

import pytest
import torch

from moge import MoGEConfig, MoGELayer

BASE = dict(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=16, num_shared_experts=1)
ROUTERS = {
    "grouped": {},
    "global": {},
    "group_limited": {"topk_groups": 2},
    "random": {"rre_vocab_size": 50},
}


def run_once(impl, router, dtype):
    torch.manual_seed(0)
    layer = MoGELayer(
        MoGEConfig(
            **BASE,
            router=router,
            expert_impl=impl,
            learned_expert_scale=True,
            bias_update_rate=0.01,
            z_loss_coef=0.01,
            **ROUTERS[router],
        )  # fmt: skip
    ).to(dtype)
    # Widths of 16: grouped_mm's CPU kernel wants 16-byte strides in bf16.
    x = torch.randn(2, 13, 16, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, 50, (2, 13))
    out = layer(x, token_ids=ids)
    (out.hidden.float().square().mean() + out.aux_loss).backward()
    layer.end_step()
    got = {"hidden": out.hidden, "aux": out.aux_loss, "x.grad": x.grad, "bias": layer.balance_bias_E}
    got.update({n: p.grad for n, p in layer.named_parameters()})
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "loop", "auto"])
def test_forward_backward_twice_is_bit_identical(impl, router, dtype):
    first = run_once(impl, router, dtype)
    second = run_once(impl, router, dtype)
    assert first.keys() == second.keys()
    for name, a in first.items():
        assert a is not None, name
        assert torch.equal(a, second[name]), name
    assert first["experts.w_gate_up_EDH"].abs().sum() > 0
