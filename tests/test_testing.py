"""moge.testing: one calling convention, keyword-only settings, the documented defaults."""

import inspect
from pathlib import Path

import pytest
import torch

from moge import MoGEConfig, MoGELayer
from moge.balance import device_load
from moge.distributed.expert_parallel import expert_placement
from moge.routing import global_topk, grouped_topk, make_random_routing_table, random_routed
from moge.testing import (
    DEFAULT_TRIALS,
    assert_balanced,
    assert_device_balanced,
    assert_group_quota,
    expected_imbalance,
)


def test_group_quota_passes_on_a_valid_selection():
    assert_group_quota(torch.tensor([[0, 5], [1, 4]]), num_experts=8, num_groups=2, top_k=2)
    assert_group_quota(torch.zeros(0, 2, dtype=torch.long), num_experts=8, num_groups=2, top_k=2)


def test_group_quota_names_the_offending_token_and_group():
    ids = torch.tensor([[0, 4], [0, 1], [2, 6]])
    with pytest.raises(AssertionError, match=r"token 1: group 0 got 2 experts \[0, 1\], expected 1"):
        assert_group_quota(ids, num_experts=8, num_groups=2, top_k=2)


@pytest.mark.parametrize(
    "ids, M, K, message",
    [
        ([[0, 0, 4, 5]], 2, 4, "chosen twice"),
        ([[0, 9]], 2, 2, "outside 0..7"),
        ([[0, 4, 5]], 2, 2, "expected top_k=2"),
        ([0, 4], 2, 2, "expected \\[tokens, top_k\\]"),
    ],
)
def test_group_quota_failures(ids, M, K, message):
    with pytest.raises(AssertionError, match=message):
        assert_group_quota(torch.tensor(ids), num_experts=8, num_groups=M, top_k=K)


def test_group_quota_rejects_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="num_groups"):
        assert_group_quota(torch.tensor([[0, 4]]), num_experts=8, num_groups=3, top_k=2)


def test_assert_balanced():
    assert_balanced(torch.tensor([10, 11, 9, 10]), tolerance=0.1)
    with pytest.raises(AssertionError, match="entry 2 has load 15, 50.0% from the mean 10"):
        assert_balanced(torch.tensor([10, 8, 15, 7]), tolerance=0.2)
    with pytest.raises(AssertionError, match="nothing was routed"):
        assert_balanced(torch.zeros(4), tolerance=0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_assert_balanced_fails_on_a_load_that_is_not_finite(bad):
    # A router that diverged gives NaN shares; NaN compares False with the tolerance.
    load = torch.tensor([1.0, 1.0, bad, 1.0])
    with pytest.raises(AssertionError, match="entry 2 has load (nan|inf)"):
        assert_balanced(load, tolerance=0.1)
    with pytest.raises(AssertionError, match="entry 0 has load"):
        assert_balanced(torch.full((4,), bad), tolerance=0.1)


def test_assert_balanced_refuses_negative_loads_naming_load():
    with pytest.raises(ValueError, match="^load: .*entry 0"):
        assert_balanced(torch.tensor([-1.0, 1.0]), tolerance=0.1)


def test_every_setting_is_keyword_only_in_one_order():
    """The checked tensor first; settings keyword-only in the order E, M, N, K, rest."""
    order = ["num_experts", "num_groups", "num_devices", "top_k", "tokens"]
    for fn in (assert_group_quota, assert_balanced, assert_device_balanced, expected_imbalance):
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert len(positional) <= 1, fn.__name__
        keyword = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        ranked = [n for n in keyword if n in order]
        assert ranked == sorted(ranked, key=order.index), (fn.__name__, keyword)


def test_legacy_positional_calls_still_work_with_a_warning():
    ids = torch.tensor([[0, 5], [1, 4]])
    with pytest.warns(DeprecationWarning, match="num_experts=8, num_groups=2, top_k=2"):
        assert_group_quota(ids, 8, 2, 2)
    with pytest.warns(DeprecationWarning, match="tolerance"):
        assert_balanced(torch.tensor([10, 10]), 0.1)
    with pytest.warns(DeprecationWarning):
        old = expected_imbalance(64, 8, 8, 16, "global", trials=50)
    new = expected_imbalance(num_experts=64, top_k=8, num_devices=8, tokens=16, router="global", trials=50)
    assert old == new
    with pytest.raises(TypeError, match="given twice"):
        assert_group_quota(ids, 8, 2, 2, top_k=2)
    with pytest.raises(AssertionError), pytest.warns(DeprecationWarning):  # still checks
        assert_group_quota(torch.tensor([[0, 1]]), 8, 2, 2)


def test_expected_imbalance_default_trials_match_the_readme():
    assert DEFAULT_TRIALS == 1000
    assert inspect.signature(expected_imbalance).parameters["trials"].default == 1000
    est = expected_imbalance(num_experts=16, num_devices=4, top_k=4, tokens=4, router="grouped")
    assert est.trials == 1000


def test_fig_2b_global_topk_is_almost_always_imbalanced():
    est = expected_imbalance(num_experts=64, num_devices=8, top_k=8, tokens=16, router="global", seed=0)
    assert est.prob_positive > 0.99
    assert est.mean > 0.3


def test_fig_2b_grouped_is_never_imbalanced():
    est = expected_imbalance(num_experts=64, num_devices=8, top_k=8, tokens=16, router="grouped")
    assert est.prob_positive == 0.0 and est.max == 0.0


def test_imbalance_shrinks_with_tokens_for_global():
    small = expected_imbalance(num_experts=64, num_devices=8, top_k=8, tokens=16, trials=500)
    large = expected_imbalance(num_experts=64, num_devices=8, top_k=8, tokens=1024, trials=500)
    assert large.mean < small.mean / 3


def test_group_limited_is_imbalanced_too():
    est = expected_imbalance(
        num_experts=64, num_devices=8, top_k=8, tokens=16, router="group_limited", topk_groups=4, trials=500
    )
    assert est.prob_positive > 0.99


def test_imbalance_score_can_exceed_one():
    """IS ranges over [0, K]: all K slots of every token on one device gives IS = K."""
    est = expected_imbalance(num_experts=64, num_devices=2, top_k=8, tokens=1, router="global", trials=200)
    assert 1.0 < est.max <= 8.0


# ------------------------------------------------------------------- per-device balance


def test_device_balanced_passes_for_grouped_routing_one_group_per_device():
    scores = torch.randn(50, 16).softmax(-1)
    _, ids = grouped_topk(scores, top_k=4, num_groups=4)
    assert_device_balanced(ids, num_experts=16, num_devices=4)
    assert_device_balanced(ids, num_experts=16, num_devices=2)  # two whole groups per device


def test_device_balanced_fails_for_global_routing_naming_the_device():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 64, generator=gen).softmax(-1)
    _, ids = global_topk(scores, top_k=8)
    with pytest.raises(
        AssertionError, match=r"device \d+ got \d+ token-slots.*IS = 0\.\d+; slots per device"
    ):
        assert_device_balanced(ids, num_experts=64, num_devices=8)
    assert_device_balanced(ids, num_experts=64, num_devices=8, tolerance=10.0)


def test_device_balanced_with_the_expert_parallel_placement():
    # Expert parallelism puts whole groups on ranks in contiguous blocks: with 4 groups on
    # 2 ranks, groups 0, 1 (experts 0..3) on rank 0. The default layout is the same one.
    assert expert_placement(8, 4, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    lopsided = torch.tensor([[0, 1], [2, 3]])  # every slot in groups 0 and 1: all on rank 0
    for placement in (None, expert_placement(8, 4, 2)):
        with pytest.raises(AssertionError, match=r"slots per device = \[4, 0\]"):
            assert_device_balanced(lopsided, num_experts=8, num_devices=2, placement=placement)
    even = torch.tensor([[0, 1], [4, 5]])  # 2 slots on each rank
    assert_device_balanced(even, num_experts=8, num_devices=2)
    assert_device_balanced(even, num_experts=8, num_devices=2, placement=expert_placement(8, 4, 2))
    interleaved_E = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])  # another layout as [E] device ids
    with pytest.raises(AssertionError, match=r"slots per device = \[4, 0\]"):
        assert_device_balanced(even, num_experts=8, num_devices=2, placement=interleaved_E)
    assert_device_balanced(lopsided, num_experts=8, num_devices=2, placement=interleaved_E)
    with pytest.raises(ValueError, match="placement"):
        assert_device_balanced(even, num_experts=8, num_devices=2, placement=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("num_experts, num_groups, world", [(8, 4, 2), (16, 8, 4), (64, 8, 8), (12, 6, 3)])
def test_device_load_counts_what_the_expert_parallel_ranks_receive(num_experts, num_groups, world):
    gen = torch.Generator().manual_seed(num_experts + world)
    ids_TK = torch.randint(0, num_experts, (40, 4), generator=gen)
    owner_E = torch.empty(num_experts, dtype=torch.long)
    for rank, experts in enumerate(expert_placement(num_experts, num_groups, world)):
        owner_E[experts] = rank
    received_W = torch.bincount(owner_E[ids_TK].reshape(-1), minlength=world)
    torch.testing.assert_close(device_load(ids_TK, num_experts, world), received_W, rtol=0, atol=0)


def test_device_balanced_on_a_fresh_layer():
    torch.manual_seed(0)
    layer = MoGELayer(MoGEConfig(d_model=32, num_experts=16, num_groups=4, top_k=4, expert_hidden=16))
    out = layer(torch.randn(2, 8, 32))
    assert_device_balanced(out.expert_ids, num_experts=16, num_devices=4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_devices": 7}, "num_devices: 7 devices do not divide num_experts=64"),
        ({"num_devices": 128}, "num_devices: 128 devices do not divide"),
        ({"trials": 0}, "trials: must be >= 1"),
        ({"tokens": 0}, "tokens: must be >= 1"),
    ],
)
def test_expected_imbalance_refuses_settings_it_cannot_estimate(change, message):
    from moge.testing import expected_imbalance

    with pytest.raises(ValueError, match=message):
        expected_imbalance(**{**dict(num_experts=64, num_devices=8, top_k=8, tokens=16), **change})


IDS = torch.tensor([[0, 4], [1, 5]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: assert_group_quota(IDS, num_experts=8, num_groups=0, top_k=2), "num_groups: must be >= 1"),
        (
            lambda: assert_group_quota(IDS, num_experts="8", num_groups=2, top_k=2),
            "num_experts: expected an integer",
        ),
        (
            lambda: assert_group_quota(IDS, num_experts=8, num_groups=2, top_k=2.0),
            "top_k: expected an integer",
        ),
        (lambda: assert_balanced(torch.tensor([1, 1]), tolerance=-0.1), "tolerance: must be >= 0.0"),
        (lambda: assert_balanced(torch.tensor([1, 1]), tolerance="10%"), "tolerance: expected a number"),
        (
            lambda: assert_device_balanced(IDS, num_experts=8, num_devices=2, tolerance=-1),
            "tolerance: must be >= 0.0",
        ),
        (
            lambda: assert_device_balanced(IDS, num_experts=8, num_devices=2.0),
            "num_devices: expected an integer",
        ),
        (
            lambda: assert_device_balanced(
                IDS, num_experts=8, num_devices=2, placement=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 9]])
            ),
            r"placement: expert ids must lie in 0\.\.7",
        ),
        (
            lambda: expected_imbalance(num_experts=8, num_groups=0, num_devices=2, top_k=2, tokens=4),
            "num_groups: must be >= 1",
        ),
        # Float ids are refused, not truncated (4.7 would read as expert 4 and pass).
        (
            lambda: assert_group_quota(IDS + 0.7, num_experts=8, num_groups=2, top_k=2),
            "expert_ids: expected integer ids, got dtype torch.float32",
        ),
        (
            lambda: assert_device_balanced(IDS.float(), num_experts=8, num_devices=2),
            "expert_ids: expected integer ids",
        ),
        (
            lambda: assert_device_balanced(
                IDS, num_experts=8, num_devices=2, placement=torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1])
            ),
            "placement: expected integer ids",
        ),
        (
            lambda: expected_imbalance(num_experts=8, num_devices=2, top_k=2, tokens=4, router="random"),
            "router: random routes by token id",
        ),
    ],
)
def test_bad_settings_raise_a_value_error_naming_the_field(call, message):
    """Not a ZeroDivisionError, TypeError or IndexError, not an assertion that can never
    pass (a negative tolerance), not num_groups=0 read as 'one group per device'."""
    with pytest.raises(ValueError, match=f"^{message}"):
        call()


def test_random_router_loads_every_device_equally_as_the_readme_table_says():
    """Random Routed Experts take top_k/num_groups experts of every group for any token id,
    so even one token id repeated loads every device (one group each) with T*K/M slots."""
    table = make_random_routing_table(50, 16, 4, 8, seed=0)
    gen = torch.Generator().manual_seed(0)
    for tokens in (torch.randint(0, 50, (37,), generator=gen), torch.full((37,), 3)):
        _, ids = random_routed(torch.rand(37, 16, generator=gen).softmax(-1), tokens, table)
        assert_device_balanced(ids, num_experts=16, num_devices=4)
        assert device_load(ids, 16, 4).tolist() == [37 * 8 // 4] * 4
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `random` |"))
    assert "IS = 0" in row.split(" | ")[3], row
