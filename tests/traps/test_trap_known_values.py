"""Known values: the balance losses on hand-made routings, written out by hand.

Eq. 8 (aux_loss_type batch / sequence / global_batch): sum_i f_i p_i with
f_i = E/(K T) * count_i; at perfect balance (every count T K / E) f_i = 1 and the
loss is sum_i p_i = 1 for softmax scores, so l_aux = alpha. The released objective
(Mixtral's) is E sum_i (count_i / T) P_i: K at perfect balance.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from moge import MoGEConfig, MoGELayer
from moge.balance import (
    balance_loss_from_counts,
    load_balancing_loss,
    released_balance_loss,
    router_z_loss,
    sequence_load_balancing_loss,
)

E, K = 8, 2


def cyclic_scores(T):
    """Row t is a fixed distribution rolled by t: every expert is in the top-K of
    exactly K of every E rows, and the mean score of every expert is 1/E."""
    v = torch.tensor([0.3, 0.25, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02])
    return torch.stack([v.roll(t) for t in range(T)])


def balanced_ids(T):
    """Token t takes experts t and t+1 (mod E): every expert gets T*K/E slots."""
    t = torch.arange(T)[:, None]
    return (t + torch.arange(K)) % E


def test_eq8_is_one_at_perfect_balance():
    scores, ids = cyclic_scores(16), balanced_ids(16)
    assert torch.bincount(ids.flatten(), minlength=E).tolist() == [4] * E
    assert_close(load_balancing_loss(scores, ids, E), torch.tensor(1.0))
    assert_close(balance_loss_from_counts(scores, torch.full((E,), 4), 16, K), torch.tensor(1.0))


def test_eq8_at_full_collapse_is_E_over_K():
    """Every token on experts 0 and 1 with all its score there: f = E/K on both, p = 1/2."""
    scores = torch.zeros(6, E)
    scores[:, :2] = 0.5
    ids = torch.tensor([[0, 1]] * 6)
    assert_close(load_balancing_loss(scores, ids, E), torch.tensor(E / K))


def test_sequence_variant_is_one_when_every_sequence_is_balanced():
    scores = cyclic_scores(8).repeat(3, 1, 1)
    ids = balanced_ids(8).repeat(3, 1, 1)
    assert_close(sequence_load_balancing_loss(scores, ids, E), torch.tensor(1.0))


def test_released_objective_is_K_at_perfect_balance():
    scores = cyclic_scores(16)
    assert_close(released_balance_loss([scores], K), torch.tensor(float(K)))
    # Pooled over layers it stays K (it is one loss over all rows).
    assert_close(released_balance_loss([scores, scores[:8]], K), torch.tensor(float(K)))


ROUTERS = {"grouped": {}, "global": {}, "group_limited": {"topk_groups": 1}, "random": {"rre_vocab_size": 20}}


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize(
    ("aux_loss_type", "value"), [("batch", 1.0), ("sequence", 1.0), ("global_batch", 1.0), ("released", K)]
)
def test_layer_aux_loss_with_uniform_scores(router, aux_loss_type, value):
    """A zero router gives uniform scores: Eq. 8 is sum_i f_i / E = 1 for any counts (so
    aux = alpha), the released objective sum_i count_i / T = K; the z-loss is log(E)^2."""
    cfg = MoGEConfig(
        d_model=4, num_experts=E, num_groups=2, top_k=K, expert_hidden=4, aux_loss_coef=0.01,
        router=router, aux_loss_type=aux_loss_type, **ROUTERS[router],
    )  # fmt: skip
    layer = MoGELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
    out = layer(torch.randn(2, 5, 4), token_ids=torch.randint(0, 20, (2, 5)))
    assert_close(out.lb_loss, torch.tensor(float(value)))
    assert_close(out.aux_loss, torch.tensor(0.01 * value))
    assert_close(out.z_loss, torch.tensor(math.log(E) ** 2))
    assert_close(router_z_loss(torch.zeros(3, E)), torch.tensor(math.log(E) ** 2))
