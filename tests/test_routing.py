import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import brute_force_route
from torch.testing import assert_close

from moge.routing import (
    RouterSettings,
    compute_scores,
    finalize_weights,
    global_topk,
    group_limited_topk,
    grouped_topk,
    make_random_routing_table,
    random_routed,
    route,
)
from moge.testing import assert_group_quota


def _scores(T, E, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=gen).softmax(-1)


def _brute_grouped(scores, top_k, num_groups):
    """Reference: per token and group, sort experts by (-score, id) in Python."""
    T, E = scores.shape
    G, q = E // num_groups, top_k // num_groups
    ids = []
    for t in range(T):
        row = []
        for g in range(num_groups):
            experts = range(g * G, (g + 1) * G)
            row += sorted(experts, key=lambda e: (-scores[t, e].item(), e))[:q]
        ids.append(row)
    return torch.tensor(ids, dtype=torch.long)


# --- grouped_topk ----------------------------------------------------------------------


def test_grouped_topk_matches_brute_force_and_keeps_raw_scores():
    scores = _scores(37, 16)
    weights, ids = grouped_topk(scores, top_k=8, num_groups=4)
    assert ids.dtype == torch.int64 and ids.shape == (37, 8)
    torch.testing.assert_close(ids, _brute_grouped(scores, 8, 4))
    # Gates are the softmax entries themselves: no renormalisation.
    assert_close(weights, scores.gather(1, ids))
    assert (weights.sum(-1) < 1).all()


def test_grouped_topk_orders_group_by_group_then_by_score():
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.05, 0.5, 0.6, 0.0]])
    _, ids = grouped_topk(scores, top_k=4, num_groups=2)
    assert ids.tolist() == [[1, 3, 6, 5]]


def test_grouped_topk_ties_go_to_lower_id():
    scores = torch.full((3, 8), 0.125)
    _, ids = grouped_topk(scores, top_k=4, num_groups=2)
    assert ids.tolist() == [[0, 1, 4, 5]] * 3
    _, ids1 = grouped_topk(scores, top_k=2, num_groups=2)  # argmax path (one per group)
    assert ids1.tolist() == [[0, 4]] * 3


def test_grouped_topk_every_group_gets_exactly_its_share():
    scores = _scores(256, 64, seed=3)
    _, ids = grouped_topk(scores, top_k=8, num_groups=8)
    per_group = torch.bincount(ids.flatten() // 8, minlength=8)
    assert per_group.tolist() == [256] * 8


def test_grouped_topk_bias_changes_selection_not_weights():
    scores = _scores(20, 8, seed=1)
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 always wins group 0
    weights, ids = grouped_topk(scores, top_k=2, num_groups=2, bias=bias)
    assert (ids[:, 0] == 3).all()
    assert_close(weights, scores.gather(1, ids))


@pytest.mark.parametrize("shape", [(5,), (1,), (3, 8)])
def test_a_bias_that_is_not_one_offset_per_expert_names_bias(shape):
    # (5,) failed inside the add with a broadcasting error; (1,) and (3, 8) broadcast and
    # were used silently, as one offset for all experts or one row per token.
    scores, bias = _scores(3, 8), torch.zeros(shape)
    for select in (
        lambda: grouped_topk(scores, 4, 4, bias=bias),
        lambda: global_topk(scores, 2, bias=bias),
        lambda: group_limited_topk(scores, 2, 4, 2, bias=bias),
    ):
        with pytest.raises(ValueError, match=r"^bias: expected \(8,\)"):
            select()


@pytest.mark.parametrize(
    "E,M,K,match",
    [(10, 4, 4, "num_groups"), (8, 4, 6, "top_k"), (8, 4, 12, "top_k"), (8, 4, 0, "top_k")],
)
def test_grouped_topk_bad_settings(E, M, K, match):
    with pytest.raises(ValueError, match=match):
        grouped_topk(_scores(4, E), top_k=K, num_groups=M)


def test_scores_must_be_2d():
    with pytest.raises(ValueError, match="scores"):
        grouped_topk(torch.rand(2, 3, 8), 2, 2)


@settings(max_examples=80, deadline=None)
@given(
    groups=st.integers(1, 6),
    per_group=st.integers(1, 6),
    quota=st.integers(1, 6),
    tokens=st.integers(0, 40),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_property_quota_holds(groups, per_group, quota, tokens, seed, ties):
    quota = min(quota, per_group)
    E, K = groups * per_group, groups * quota
    scores = _scores(tokens, E, seed)
    if ties:  # coarse rounding makes many exact ties
        scores = (scores * 4).round() / 4
    weights, ids = grouped_topk(scores, K, groups)
    assert ids.shape == (tokens, K)
    assert_group_quota(ids, num_experts=E, num_groups=groups, top_k=K)
    assert_close(weights, scores.gather(1, ids))
    torch.testing.assert_close(ids, _brute_grouped(scores, K, groups).reshape(tokens, K))


@settings(max_examples=40, deadline=None)
@given(E=st.integers(1, 24), K=st.integers(1, 24), T=st.integers(1, 20), seed=st.integers(0, 999))
def test_property_one_group_equals_global_topk(E, K, T, seed):
    K = min(K, E)
    scores = _scores(T, E, seed)
    assert_close(grouped_topk(scores, K, 1), global_topk(scores, K))


def test_k_equals_m_takes_the_argmax_of_every_group():
    scores = _scores(50, 12, seed=4)
    _, ids = grouped_topk(scores, top_k=3, num_groups=3)
    expected = scores.view(50, 3, 4).argmax(-1) + torch.tensor([0, 4, 8])
    torch.testing.assert_close(ids, expected)


@pytest.mark.parametrize("G", [2, 4, 7, 16, 64])
def test_one_per_group_ties_anywhere_go_to_the_first(G):
    # Scores rounded to three levels tie all over a group; the first best must win, as
    # a stable descending sort says (the k == 1 path does not sort).
    gen = torch.Generator().manual_seed(G)
    scores = torch.randint(0, 3, (300, 3 * G), generator=gen).float() / 4
    _, ids = grouped_topk(scores, top_k=3, num_groups=3)
    order = torch.sort(scores.view(300, 3, G), dim=-1, descending=True, stable=True).indices
    torch.testing.assert_close(ids, order[..., 0] + torch.arange(3) * G, rtol=0, atol=0)


@pytest.mark.parametrize("K", [4, 8])
def test_grouped_topk_gradient_reaches_only_the_selected_scores(K):
    # Selection runs off the graph (on the biased scores); the gates are the raw scores
    # of the selected experts, so their gradient lands there and nowhere else.
    scores = _scores(30, 16, seed=7).requires_grad_()
    bias = torch.linspace(-0.05, 0.05, 16)
    weights, ids = grouped_topk(scores, K, 4, bias=bias)
    upstream = torch.rand(weights.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    weights.backward(upstream)
    expected = torch.zeros(30, 16).scatter_add_(1, ids, upstream)
    torch.testing.assert_close(scores.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("K", [4, 8])
def test_grouped_topk_takes_non_contiguous_and_empty_scores(K):
    scores = _scores(16, 25, seed=8)[:, :16]  # a column slice: rows 25 apart
    assert not scores.is_contiguous()
    for got, want in zip(grouped_topk(scores, K, 4), grouped_topk(scores.contiguous(), K, 4)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights, ids = grouped_topk(torch.zeros(0, 16), K, 4)
    assert weights.shape == ids.shape == (0, K)


def test_single_token():
    weights, ids = grouped_topk(_scores(1, 8), 4, 4)
    assert ids.shape == weights.shape == (1, 4)
    assert_group_quota(ids, num_experts=8, num_groups=4, top_k=4)


# --- global and group-limited -------------------------------------------------------------


def test_global_topk_is_topk_with_stable_ties():
    scores = _scores(30, 10, seed=5)
    weights, ids = global_topk(scores, 3)
    ref = torch.topk(scores, 3)
    assert_close(weights, ref.values)
    torch.testing.assert_close(ids, ref.indices)
    _, tie_ids = global_topk(torch.ones(2, 6), 4)
    assert tie_ids.tolist() == [[0, 1, 2, 3]] * 2


def _brute_group_limited(scores, K, M, topk_groups, group_score):
    T, E = scores.shape
    G = E // M
    out = []
    for t in range(T):
        s = scores[t].tolist()
        gs = []
        for g in range(M):
            vals = sorted(s[g * G : (g + 1) * G], reverse=True)
            gs.append(vals[0] if group_score == "max" else vals[0] + vals[1])
        kept = sorted(range(M), key=lambda g: (-gs[g], g))[:topk_groups]
        cands = [e for g in kept for e in range(g * G, (g + 1) * G)]
        out.append(sorted(cands, key=lambda e: (-s[e], e))[:K])
    return torch.tensor(out)


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_group_limited_matches_brute_force(group_score):
    scores = _scores(40, 16, seed=6)
    weights, ids = group_limited_topk(scores, 4, 4, 2, group_score)
    torch.testing.assert_close(ids, _brute_group_limited(scores, 4, 4, 2, group_score))
    assert_close(weights, scores.gather(1, ids))
    # At most topk_groups distinct groups per token.
    assert ((ids // 4).sort(-1).values.diff(dim=-1) != 0).sum(-1).max() <= 1


def test_group_limited_can_put_every_expert_in_one_group():
    scores = torch.tensor([[0.3, 0.3, 0.2, 0.1, 0.05, 0.03, 0.01, 0.01]])
    _, ids = group_limited_topk(scores, 4, 2, 1)
    assert ids.tolist() == [[0, 1, 2, 3]]  # all from group 0: not MoGE


def test_group_limited_all_groups_equals_global():
    scores = _scores(25, 12, seed=7)
    assert_close(group_limited_topk(scores, 5, 3, 3), global_topk(scores, 5))


@pytest.mark.parametrize("topk_groups", [0, 5, 1])
def test_group_limited_bad_topk_groups(topk_groups):
    with pytest.raises(ValueError, match="topk_groups"):
        group_limited_topk(_scores(3, 16), 8, 4, topk_groups)  # 1 group of 4 < 8


def test_group_limited_top2_sum_of_one_expert_groups_names_group_score():
    # MoGEConfig refuses it; called directly it was torch.topk's "selected index k out of range".
    with pytest.raises(ValueError, match="^group_score: top2_sum"):
        group_limited_topk(_scores(3, 8), 2, 8, 4, "top2_sum")
    group_limited_topk(_scores(3, 8), 2, 8, 4, "max")  # a group's max needs one expert


# --- random routed experts -----------------------------------------------------------------


def test_random_table_is_fixed_by_seed_and_respects_quota():
    t1 = make_random_routing_table(100, 16, 4, 8, seed=3)
    t2 = make_random_routing_table(100, 16, 4, 8, seed=3)
    t3 = make_random_routing_table(100, 16, 4, 8, seed=4)
    torch.testing.assert_close(t1, t2)
    assert not torch.equal(t1, t3)
    assert_group_quota(t1, num_experts=16, num_groups=4, top_k=8)
    # Every expert of a group is used by some token (the map spreads tokens).
    assert torch.bincount(t1.flatten(), minlength=16).min() > 0


def test_random_routed_looks_up_token_ids():
    table = make_random_routing_table(10, 8, 2, 2, seed=0)
    scores = _scores(6, 8)
    tokens = torch.tensor([3, 3, 7, 0, 9, 3])
    weights, ids = random_routed(scores, tokens, table)
    torch.testing.assert_close(ids, table[tokens])
    assert_close(weights, scores.gather(1, ids))
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[5])


def test_random_routed_rejects_out_of_range_ids():
    table = make_random_routing_table(10, 8, 2, 2, seed=0)
    with pytest.raises(ValueError, match="token_ids"):
        random_routed(_scores(2, 8), torch.tensor([1, 10]), table)
    with pytest.raises(ValueError, match="token_ids"):
        random_routed(_scores(2, 8), torch.tensor([1]), table)


# --- scores and post-processing ----------------------------------------------------------------


def test_compute_scores_float32_from_bf16():
    logits = torch.randn(5, 8).bfloat16()
    s = compute_scores(logits, "softmax")
    assert s.dtype == torch.float32
    assert_close(s.sum(-1), torch.ones(5))
    assert_close(compute_scores(logits, "sigmoid"), logits.float().sigmoid())
    with pytest.raises(ValueError, match="score_func"):
        compute_scores(logits, "relu")


def test_finalize_weights_normalise_and_scale():
    w = torch.tensor([[0.2, 0.3], [0.1, 0.1]])
    assert_close(finalize_weights(w, False, 1.0), w)
    assert_close(finalize_weights(w, True, 1.0), torch.tensor([[0.4, 0.6], [0.5, 0.5]]))
    assert_close(finalize_weights(w, True, 2.5), torch.tensor([[1.0, 1.5], [1.25, 1.25]]))


@pytest.mark.parametrize("router", ["grouped", "global", "group_limited"])
def test_route_dispatches(router):
    scores = _scores(9, 8)
    s = RouterSettings(router=router, top_k=4, num_groups=2, topk_groups=1, normalize_weights=True)
    weights, ids = route(scores, s)
    # The selection of the named router, checked token by token, and its renormalised gates.
    assert torch.equal(ids, brute_force_route(scores, router, 4, 2, topk_groups=1))
    picked = scores.gather(1, ids)
    assert_close(weights, picked / picked.sum(-1, keepdim=True), rtol=0, atol=0)


def test_route_random_needs_token_ids():
    with pytest.raises(ValueError, match="token_ids"):
        route(_scores(3, 8), RouterSettings(router="random", top_k=2, num_groups=2))


def test_route_unknown_router():
    with pytest.raises(ValueError, match="router"):
        route(_scores(3, 8), RouterSettings(router="hash", top_k=2, num_groups=2))


def test_all_routers_on_zero_tokens():
    scores = torch.zeros(0, 8)
    for r in ("grouped", "global", "group_limited"):
        w, ids = route(scores, RouterSettings(router=r, top_k=4, num_groups=2, topk_groups=2))
        assert w.shape == ids.shape == (0, 4)


def test_grouped_topk_exhaustive_small_permutations():
    # Every ordering of 4 distinct scores in 2 groups of 2, K=2: always the group argmax.
    for perm in itertools.permutations([0.1, 0.2, 0.3, 0.4]):
        s = torch.tensor([perm])
        _, ids = grouped_topk(s, 2, 2)
        assert ids.tolist() == [[int(perm[1] > perm[0]), 2 + int(perm[3] > perm[2])]]
