import math

import pytest
import torch
from torch.testing import assert_close

from moge.balance import (
    balance_loss_from_counts,
    device_load,
    expert_load,
    imbalance_score,
    load_balancing_loss,
    router_z_loss,
    routing_stats,
    sequence_load_balancing_loss,
    update_balance_bias,
)
from moge.routing import global_topk, grouped_topk


def _scores(T, E, seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).softmax(-1)


# --- load balancing loss ---------------------------------------------------------------


def test_lb_loss_is_one_at_perfect_balance():
    scores = torch.full((8, 4), 0.25)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert_close(load_balancing_loss(scores, ids, 4), torch.tensor(1.0))


def test_lb_loss_matches_hand_computation():
    scores = _scores(6, 4, seed=1)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 0], [2, 0]])
    T, K, E = 6, 2, 4
    counts = torch.tensor([6.0, 3.0, 2.0, 1.0])
    expected = sum((E / (K * T)) * counts[i] * scores[:, i].mean() for i in range(E))
    assert_close(load_balancing_loss(scores, ids, E), expected)


def test_lb_loss_collapsed_routing_is_maximal():
    # Everyone on expert 0 with score ~1: f_0 = E/K, p_0 = 1 -> loss E/K.
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5)
    ids = torch.tensor([[0]] * 5)
    assert_close(load_balancing_loss(scores, ids, 4), torch.tensor(4.0))


def test_lb_loss_uses_the_given_selection_and_full_scores():
    scores = _scores(32, 8, seed=2)
    _, grouped = grouped_topk(scores, 4, 4)
    _, glob = global_topk(scores, 4)
    # Same p, different f: the loss follows the selection dispatch used.
    assert not torch.isclose(load_balancing_loss(scores, grouped, 8), load_balancing_loss(scores, glob, 8))


def test_lb_loss_gradient_reaches_scores_only_through_p():
    logits = torch.randn(10, 4, requires_grad=True)
    scores = logits.softmax(-1)
    ids = scores.argmax(-1, keepdim=True)
    load_balancing_loss(scores, ids, 4).backward()
    counts = torch.bincount(ids.flatten(), minlength=4).float()
    # d loss / d p_i = f_i, so d loss / d scores[t, i] = f_i / T.
    s = logits.detach().softmax(-1)
    f = counts * 4 / 10
    g_scores = (f / 10).expand(10, 4)
    expected = s * (g_scores - (g_scores * s).sum(-1, keepdim=True))
    assert_close(logits.grad, expected)


def test_lb_loss_shape_errors():
    with pytest.raises(ValueError, match="scores"):
        load_balancing_loss(torch.rand(3, 5), torch.zeros(3, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="expert_ids"):
        load_balancing_loss(torch.rand(3, 4), torch.zeros(2, 1, dtype=torch.long), 4)


def test_lb_loss_zero_tokens_is_zero():
    assert load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), 4).item() == 0.0


def test_sequence_loss_averages_per_sequence_losses():
    scores = _scores(12, 6, seed=3).view(3, 4, 6)
    ids = torch.stack([global_topk(scores[b], 2)[1] for b in range(3)])
    per_seq = [load_balancing_loss(scores[b], ids[b], 6) for b in range(3)]
    assert_close(sequence_load_balancing_loss(scores, ids, 6), torch.stack(per_seq).mean())


def test_sequence_loss_one_sequence_equals_batch_loss():
    scores = _scores(9, 6, seed=4)
    _, ids = global_topk(scores, 3)
    assert_close(
        sequence_load_balancing_loss(scores[None], ids[None], 6), load_balancing_loss(scores, ids, 6)
    )


def test_global_batch_counts_over_micro_batches():
    # Two micro-batches whose own loads are skewed but whose union is balanced.
    scores = torch.full((4, 2), 0.5)
    ids_a = torch.tensor([[0]] * 4)
    ids_b = torch.tensor([[1]] * 4)
    counts = expert_load(torch.cat([ids_a, ids_b]), 2)
    assert_close(balance_loss_from_counts(scores, counts, 8, 1), torch.tensor(1.0))
    assert_close(load_balancing_loss(scores, ids_a, 2), torch.tensor(1.0))  # p uniform
    skew = torch.tensor([[0.9, 0.1]] * 4)
    assert balance_loss_from_counts(skew, counts, 8, 1) < load_balancing_loss(skew, ids_a, 2)


# --- z-loss and bias ---------------------------------------------------------------------


def test_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + torch.logsumexp(torch.tensor([1.0, 2.0]), 0).item() ** 2) / 2
    assert_close(router_z_loss(logits), torch.tensor(expected))
    assert router_z_loss(torch.zeros(0, 3)).item() == 0.0


def test_bias_update_sign_rule_and_centring():
    bias = torch.zeros(4)
    load = torch.tensor([10, 2, 4, 4])  # mean 5
    new = update_balance_bias(bias, load, rate=0.1)
    step = torch.tensor([-0.1, 0.1, 0.1, 0.1])
    assert_close(new, step - step.mean())
    assert_close(new.sum(), torch.tensor(0.0))
    assert new.dtype == torch.float32


def test_bias_update_with_equal_load_is_a_no_op():
    bias = torch.tensor([0.3, -0.3, 0.1, -0.1])
    assert_close(update_balance_bias(bias, torch.tensor([5, 5, 5, 5]), 0.1), bias)


def _select(router, scores, bias=None):
    if router == "grouped":
        return grouped_topk(scores, 4, 4, bias=bias)[1]
    return global_topk(scores, 4, bias=bias)[1]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("router", ["grouped", "global"])
def test_bias_rule_balances_a_skewed_router(score_func, router):
    gen = torch.Generator().manual_seed(0)
    skew = torch.linspace(0, 2, 4).repeat(4)  # later experts of every group preferred
    bias = torch.zeros(16)
    for _ in range(300):
        logits = torch.randn(256, 16, generator=gen) * 0.5 + skew
        scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        ids = _select(router, scores, bias)
        bias = update_balance_bias(bias, expert_load(ids, 16), rate=0.002)
    load = expert_load(ids, 16).float()
    assert load.max() / load.mean() < 1.5
    unbiased = expert_load(_select(router, scores), 16)
    assert unbiased.float().max() / unbiased.float().mean() > 2.0  # the skew was real


# --- imbalance score and stats ---------------------------------------------------------------


def test_imbalance_score_eq3():
    # 4 experts on 2 devices; 3 tokens, K=2: device 0 gets 5 slots, device 1 gets 1.
    ids = torch.tensor([[0, 1], [1, 2], [0, 1]])
    assert device_load(ids, 4, 2).tolist() == [5, 1]
    assert imbalance_score(ids, 4, 2) == pytest.approx(4 / 3)


def test_imbalance_score_zero_for_grouped_router():
    scores = _scores(123, 64, seed=9)
    _, ids = grouped_topk(scores, 8, 8)
    assert imbalance_score(ids, 64, 8) == 0.0
    _, ids = global_topk(scores, 8)
    assert imbalance_score(ids, 64, 8) > 0.0


def test_imbalance_score_errors_and_empty():
    with pytest.raises(ValueError, match="num_devices"):
        imbalance_score(torch.zeros(2, 1, dtype=torch.long), 6, 4)
    assert imbalance_score(torch.zeros(0, 2, dtype=torch.long), 8, 2) == 0.0


def test_routing_stats():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    stats = routing_stats(ids, 4, 2, scores=torch.full((3, 4), 0.25))
    assert stats.expert_load.tolist() == [3, 2, 1, 0]
    assert stats.group_load.tolist() == [5, 1]
    assert stats.imbalance_score == pytest.approx(4 / 3)
    assert stats.max_over_mean == pytest.approx(3 / 1.5)
    load = torch.tensor([3.0, 2, 1, 0])
    assert stats.cv == pytest.approx((load.std(unbiased=False) / load.mean()).item())
    p = load / load.sum()
    assert stats.load_entropy == pytest.approx(-(p[:3] * p[:3].log()).sum().item())
    assert stats.score_entropy == pytest.approx(math.log(4))
    assert stats.dead_experts == 1
    assert stats.as_dict()["expert_load"] == [3, 2, 1, 0]


def test_routing_stats_uniform_has_max_entropy():
    ids = torch.arange(8).view(4, 2)
    stats = routing_stats(ids, 8, 4)
    assert stats.load_entropy == pytest.approx(math.log(8))
    assert stats.max_over_mean == 1.0 and stats.cv == 0.0 and stats.dead_experts == 0
    assert stats.score_entropy is None
