import pytest
import torch

from moge.testing import assert_balanced, assert_group_quota, expected_imbalance


def test_group_quota_passes_on_a_valid_selection():
    assert_group_quota(torch.tensor([[0, 5], [1, 4]]), 8, 2, 2)
    assert_group_quota(torch.zeros(0, 2, dtype=torch.long), 8, 2, 2)


def test_group_quota_names_token_and_group():
    ids = torch.tensor([[0, 5], [1, 2]])  # token 1 took both experts from group 0
    with pytest.raises(AssertionError, match=r"token 1: group 0 got 2 experts \[1, 2\], expected 1"):
        assert_group_quota(ids, 8, 2, 2)


def test_group_quota_catches_duplicates_range_and_width():
    with pytest.raises(AssertionError, match="token 0: the same expert was chosen twice"):
        assert_group_quota(torch.tensor([[0, 0, 4, 5]]), 8, 2, 4)
    with pytest.raises(AssertionError, match="id 9 is outside 0..7"):
        assert_group_quota(torch.tensor([[0, 9]]), 8, 2, 2)
    with pytest.raises(AssertionError, match="3 experts per token, expected top_k=2"):
        assert_group_quota(torch.tensor([[0, 4, 5]]), 8, 2, 2)
    with pytest.raises(AssertionError, match="expected \\[tokens, top_k\\]"):
        assert_group_quota(torch.tensor([0, 4]), 8, 2, 2)
    with pytest.raises(ValueError, match="num_groups"):
        assert_group_quota(torch.tensor([[0, 4]]), 8, 3, 2)


def test_assert_balanced():
    assert_balanced(torch.tensor([10, 11, 9, 10]), tolerance=0.1)
    with pytest.raises(AssertionError, match=r"entry 2 has load 15, 50.0% from the mean 10"):
        assert_balanced(torch.tensor([10, 8, 15, 7]), tolerance=0.2)
    with pytest.raises(AssertionError, match="nothing was routed"):
        assert_balanced(torch.zeros(4), tolerance=0.1)


def test_fig_2b_global_topk_is_almost_always_imbalanced():
    est = expected_imbalance(64, 8, 8, tokens=16, router="global", trials=2000, seed=0)
    assert est.prob_positive > 0.99
    assert est.mean > 0.3


def test_fig_2b_grouped_is_never_imbalanced():
    est = expected_imbalance(64, 8, 8, tokens=16, router="grouped", trials=2000, seed=0)
    assert est.prob_positive == 0.0 and est.max == 0.0


def test_imbalance_shrinks_with_tokens_for_global():
    small = expected_imbalance(64, 8, 8, tokens=16, trials=500)
    large = expected_imbalance(64, 8, 8, tokens=1024, trials=500)
    assert large.mean < small.mean / 3


def test_group_limited_is_imbalanced_too():
    est = expected_imbalance(64, 8, 8, tokens=16, router="group_limited", topk_groups=4, trials=500)
    assert est.prob_positive > 0.99
