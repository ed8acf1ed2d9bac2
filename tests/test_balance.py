import math

import pytest
import torch
from torch.testing import assert_close

from moge import balance
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
from moge.layer import MoGEConfig
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
    # E=4 in 2 groups, K=2. p = mean of the full scores = [0.45, 0.3, 0.15, 0.1].
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.3, 0.1, 0.1]])
    _, grouped = grouped_topk(scores, 2, 2)  # experts 0 and 2 for both tokens
    _, glob = global_topk(scores, 2)  # experts 0 and 1 for both tokens
    assert grouped.tolist() == [[0, 2], [0, 2]] and glob.tolist() == [[0, 1], [0, 1]]
    # f = E/(K T) * counts = counts: grouped [2, 0, 2, 0] -> 2*0.45 + 2*0.15 = 1.2;
    # global [2, 2, 0, 0] -> 2*0.45 + 2*0.3 = 1.5. The unselected experts' scores still
    # count in p (selected-only renormalised scores would give other values).
    assert_close(load_balancing_loss(scores, grouped, 4), torch.tensor(1.2))
    assert_close(load_balancing_loss(scores, glob, 4), torch.tensor(1.5))


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


@pytest.mark.parametrize("bad", [6, -1])
def test_sequence_loss_refuses_expert_ids_outside_num_experts(bad):
    """Each sequence's ids are offset by b * E into one count: an id of 6 (of 6 experts) in
    sequence 0 was counted as sequence 1's expert 0, a -1 in sequence 1 as sequence 0's
    expert 5, and the loss came back with no error."""
    scores = _scores(8, 6, seed=5).view(2, 4, 6)
    ids = torch.stack([global_topk(scores[b], 2)[1] for b in range(2)])
    ids[0 if bad > 0 else 1, 1, 1] = bad
    with pytest.raises(ValueError, match=f"^expert_ids: id {bad} is outside 0..5"):
        sequence_load_balancing_loss(scores, ids, 6)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scores=torch.full((2, 4, 5), 0.2)), "^scores: expected \\[sequences, length, 6\\]"),
        (dict(ids=torch.zeros(2, 3, 2, dtype=torch.long)), "^expert_ids: expected \\[2, 4, top_k\\]"),
        (
            dict(mask=torch.ones(2, 4, dtype=torch.long)),
            "^mask_BL: expected a bool tensor of shape \\(2, 4\\)",
        ),
        (
            dict(mask=torch.ones(4, 2, dtype=torch.bool)),
            "^mask_BL: expected a bool tensor of shape \\(2, 4\\)",
        ),
    ],
)
def test_sequence_loss_bad_shapes_name_the_argument(change, message):
    scores = _scores(8, 6, seed=5).view(2, 4, 6)
    ids = torch.stack([global_topk(scores[b], 2)[1] for b in range(2)])
    args = {"scores": scores, "ids": ids, "mask": None, **change}
    with pytest.raises(ValueError, match=message):
        sequence_load_balancing_loss(args["scores"], args["ids"], 6, mask_BL=args["mask"])


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


def test_global_batch_loss_keeps_the_token_count_a_tensor():
    """N as a 0-dim tensor (what global_batch_balance_loss passes, so a GPU need not read
    it back) gives the int's value; and the global-batch loss is f . S / N times calls."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 4, generator=gen).softmax(-1)
    counts = torch.tensor([7, 1, 5, 3])  # 16 slots of K=2 over the step: N = 8 tokens, T = 6 here
    assert_close(
        balance_loss_from_counts(scores, counts, torch.tensor(8), 2),
        balance_loss_from_counts(scores, counts, 8, 2),
    )
    by_hand = (counts.float() * 4 / (2 * 8) * scores.sum(0) / 8).sum() * 3
    assert_close(balance.global_batch_balance_loss(scores, counts, 2, calls=3), by_hand)
    assert balance.global_batch_balance_loss(scores, torch.zeros(4, dtype=torch.long), 2, 3).item() == 0.0


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


@pytest.mark.parametrize("bad", [4, -1])
def test_statistics_refuse_expert_ids_outside_num_experts(bad):
    """An id past num_experts (the wrong num_experts, or ids of another layer) is refused
    by name: routing_stats counted it as a fifth expert and split five "experts" into
    the groups, load_balancing_loss and imbalance_score failed on a tensor size."""
    ids = torch.tensor([[0, 1], [2, bad]])
    message = f"^expert_ids: id {bad} is outside 0..3 \\(num_experts=4\\)"
    for call in (
        lambda: routing_stats(ids, 4, 2),
        lambda: imbalance_score(ids, 4, 2),
        lambda: device_load(ids, 4, 2),
        lambda: load_balancing_loss(torch.full((2, 4), 0.25), ids, 4),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    masked = routing_stats(ids, 4, 2, mask=torch.tensor([True, False]))  # a padded row is not read
    assert masked.expert_load.tolist() == [1, 1, 0, 0]


def test_routing_stats_uniform_has_max_entropy():
    ids = torch.arange(8).view(4, 2)
    stats = routing_stats(ids, 8, 4)
    assert stats.load_entropy == pytest.approx(math.log(8))
    assert stats.max_over_mean == 1.0 and stats.cv == 0.0 and stats.dead_experts == 0
    assert stats.score_entropy is None


# --------------------------------------------------- the released code's objective


def _released_oracle(gate_logits: tuple, num_experts: int, top_k: int) -> torch.Tensor:
    """My reading of the released Pangu code's aux loss (Mixtral's load_balancing_loss_func,
    no attention mask), written step by step: concatenate every layer's logits, softmax,
    global top-k, the fraction of rows choosing each expert per slot, the mean probability
    per expert, their product summed, times the number of experts."""
    logits = torch.cat(list(gate_logits), dim=0)
    weights = torch.softmax(logits, dim=-1)
    _, chosen = torch.topk(weights, top_k, dim=-1)
    mask = torch.nn.functional.one_hot(chosen, num_experts).float()  # [N, K, E]
    tokens_per_expert = mask.mean(dim=0)  # [K, E]
    prob_per_expert = weights.mean(dim=0)  # [E]
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts


def test_released_loss_matches_the_oracle_over_layers_with_gradients():
    gen = torch.Generator().manual_seed(0)
    E, K = 16, 4
    logits = [torch.randn(T, E, generator=gen, dtype=torch.float64).requires_grad_() for T in (12, 7, 20)]
    ours = balance.released_balance_loss([x.softmax(-1) for x in logits], top_k=K)
    expected = _released_oracle(tuple(logits), E, K)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)
    g_ours = torch.autograd.grad(ours, logits)
    g_expected = torch.autograd.grad(expected, logits)
    for a, b in zip(g_ours, g_expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-9)


def test_released_loss_is_K_times_eq8_on_the_same_counts():
    """One layer, global top-k counts: released = K * Eq. 8; at perfect balance K."""
    gen = torch.Generator().manual_seed(1)
    E, K = 16, 4
    scores = torch.randn(64, E, generator=gen).softmax(-1)
    _, ids = global_topk(scores, top_k=K)
    eq8 = balance.load_balancing_loss(scores, ids, num_experts=E)
    released = balance.released_balance_loss([scores], top_k=K)
    torch.testing.assert_close(released, K * eq8, rtol=1e-6, atol=0)
    uniform = torch.full((8, E), 1.0 / E)
    # Ties go to the lowest ids: only experts 0..K-1 are chosen, yet p is uniform: E * K/E = K.
    torch.testing.assert_close(balance.released_balance_loss([uniform], top_k=K), torch.tensor(float(K)))


def test_released_coef_pulls_each_layer_like_eq8_alpha_K_c_over_L():
    """L identical layers, global counts: the pooled released loss's gradient on one
    layer's scores equals that of Eq. 8 on that layer times K / L (the README's rule)."""
    gen = torch.Generator().manual_seed(3)
    E, K, L = 16, 4, 6
    base = torch.randn(40, E, generator=gen, dtype=torch.float64).softmax(-1)
    layers = [base.clone().requires_grad_() for _ in range(L)]
    released = balance.released_balance_loss(layers, top_k=K)
    g_released = torch.autograd.grad(released, layers[2])[0]
    one = base.clone().requires_grad_()
    _, ids = global_topk(one.detach(), top_k=K)
    g_eq8 = torch.autograd.grad(balance.load_balancing_loss(one, ids, num_experts=E), one)[0]
    torch.testing.assert_close(g_released.double(), (K / L) * g_eq8.double(), rtol=1e-6, atol=1e-12)


def test_released_loss_differs_from_eq8_on_grouped_counts():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(32, 16, generator=gen).softmax(-1)
    _, grouped_ids = grouped_topk(scores, top_k=4, num_groups=4)
    eq8_grouped = balance.load_balancing_loss(scores, grouped_ids, num_experts=16)
    released = balance.released_balance_loss([scores], top_k=4)
    assert abs(float(released) - 4 * float(eq8_grouped)) > 1e-4


def test_released_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        balance.released_balance_loss([], top_k=2)
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        balance.released_balance_loss([torch.rand(3, 8), torch.rand(3, 4)], top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        balance.released_balance_loss([torch.rand(3, 8)], top_k=9)
    assert float(balance.released_balance_loss([torch.rand(0, 8)], top_k=2)) == 0.0


def _capture_router_logits(layers):
    """Forward pre-hooks recording each layer's router logits x @ W^T (float64)."""
    logits = []

    def hook(module, args):
        x = args[0].reshape(-1, module.config.d_model)
        logits.append(x.double() @ module.router.weight.double().T)

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    return logits, handles


def test_model_with_released_aux_loss_pools_all_layers_like_the_release():
    from moge.model import ModelConfig, MoGETransformer

    torch.manual_seed(0)
    model_cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    moe_cfg = MoGEConfig(d_model=32, num_experts=8, num_groups=4, top_k=4, expert_hidden=16,
                         aux_loss_coef=0.01, aux_loss_type="released")  # fmt: skip
    model = MoGETransformer(model_cfg, moe_cfg)
    logits, handles = _capture_router_logits(list(model.moe_layers()))
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens, tokens)
    for h in handles:
        h.remove()
    assert len(logits) == 3
    expected = 0.01 * _released_oracle(tuple(logits), 8, 4)
    torch.testing.assert_close(out.aux_loss.double(), expected, rtol=1e-5, atol=0)
    per_layer_sum = sum(r.aux_loss for r in out.routing)
    assert abs(per_layer_sum.item() - out.aux_loss.item()) > 1e-5, "pooled, not the sum of per-layer losses"


def test_dropin_aux_loss_pools_released_layers():
    import moge

    torch.manual_seed(0)
    cfg = MoGEConfig(d_model=16, num_experts=8, num_groups=2, top_k=2, expert_hidden=8,
                     aux_loss_coef=0.1, aux_loss_type="released")  # fmt: skip
    model = torch.nn.Sequential(moge.MoGEMLP(cfg), moge.MoGEMLP(cfg))
    logits, handles = _capture_router_logits([model[0], model[1]])
    model(torch.randn(10, 16))
    for h in handles:
        h.remove()
    torch.testing.assert_close(
        moge.aux_loss(model).double(), 0.1 * _released_oracle(tuple(logits), 8, 2), rtol=1e-5, atol=0
    )


def test_released_is_a_config_option():
    from moge.training.config import load_config

    cfg = load_config("tiny-moge", ["moe.aux_loss_type=released"])
    assert cfg.moe.aux_loss_type == "released"
    assert load_config("pangu-pro-moe-72b").moe.aux_loss_type == "released"


@pytest.mark.parametrize(
    "aux_loss_type, coef, released_c", [("batch", 0.004, 0.002), ("released", 0.003, 0.003)]
)
def test_exported_router_aux_loss_coef_follows_the_objective(tmp_path, aux_loss_type, coef, released_c):
    """config.json's router_aux_loss_coef is the released c: alpha * L / K for Eq. 8 (one MoE
    layer here), c itself for released."""
    import json

    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    assert balance.released_coefficient(coef, aux_loss_type, 2, 1) == pytest.approx(released_c)
    m = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, qk_norm=True)
    e = MoGEConfig(d_model=16, num_experts=4, num_groups=1, top_k=2, expert_hidden=8, router="global",
                   aux_loss_coef=coef, aux_loss_type=aux_loss_type)  # fmt: skip
    MoGETransformer(m, e).save_pretrained(tmp_path / "out", layout="qwen3_moe")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["router_aux_loss_coef"] == pytest.approx(released_c)


def test_load_summary_of_counts():
    """The statistics the loop logs from a step's counts, and routing_stats from one call's."""
    s = balance.load_summary(torch.tensor([4, 0, 2, 2]), 2, tokens=4)  # groups [4, 0] and [2, 2]
    assert s["imbalance_score"] == 0.0 and s["dead_experts"] == 1
    assert s["max_over_mean"] == 2.0 and s["cv"] == pytest.approx(math.sqrt(2.0) / 2)
    assert s["load_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    s = balance.load_summary(torch.tensor([6, 0, 2, 0]), 2, tokens=4)  # groups 6 and 2: IS = 1
    assert s["imbalance_score"] == 1.0
    empty = balance.load_summary(torch.zeros(4, dtype=torch.long), 2, tokens=0)
    assert empty["imbalance_score"] == 0.0 and empty["load_entropy"] == 0.0 and empty["dead_experts"] == 4
    assert math.isnan(empty["max_over_mean"]) and math.isnan(empty["cv"])
    with pytest.raises(ValueError, match="num_groups: 3 does not divide num_experts=4"):
        balance.load_summary(torch.ones(4), 3, tokens=1)
    with pytest.raises(ValueError, match="num_groups: 3 does not divide num_experts=8"):
        balance.routing_stats(torch.zeros(4, 2, dtype=torch.long), 8, 3)  # a ValueError, not einops'


@pytest.mark.parametrize(
    ("layout", "router", "first_dense"), [("pangu", "grouped", 0), ("qwen3_moe", "global", 1)]
)
def test_exported_coefficient_of_an_eq8_model_pulls_its_layers_as_moge_did(
    tmp_path, layout, router, first_dense
):
    """An Eq. 8 model adds alpha * Eq. 8 for each of its L MoE layers; the released objective
    is one loss over all layers' rows. On L layers that route alike (global top-k counts, so
    the counts agree too), c * released must equal the model's alpha * sum of Eq. 8."""
    import json

    from moge.interop import save_pretrained
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    E, K, alpha, n_layers = 8, 4, 0.003, 3
    m = ModelConfig(vocab_size=64, d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                    qk_norm=layout == "qwen3_moe", first_dense_layers=first_dense)  # fmt: skip
    e = MoGEConfig(d_model=16, num_experts=E, num_groups=K if router == "grouped" else 1, top_k=K,
                   expert_hidden=8, router=router, num_shared_experts=int(layout == "pangu"),
                   aux_loss_coef=alpha, aux_loss_type="batch")  # fmt: skip
    L = n_layers - first_dense
    save_pretrained(MoGETransformer(m, e), tmp_path, layout=layout)
    c = json.loads((tmp_path / "config.json").read_text())["router_aux_loss_coef"]
    scores = torch.randn(48, E, generator=torch.Generator().manual_seed(5)).softmax(-1)
    _, ids = global_topk(scores, top_k=K)
    moge_loss = alpha * L * balance.load_balancing_loss(scores, ids, num_experts=E)
    assert_close(c * balance.released_balance_loss([scores] * L, top_k=K), moge_loss, rtol=1e-6, atol=0)
