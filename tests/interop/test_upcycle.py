"""Tests of moge/interop/upcycle.py: dense -> MoGE upcycling, exact at step 0."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from moge.experts import SwiGLU
from moge.interop.upcycle import plan_upcycle, upcycle_ffn, upcycle_model
from moge.layer import MoGEConfig, MoGELayer
from moge.model import MoGETransformer
from moge.model.config import ModelConfig

V, D, F = 64, 32, 64  # vocabulary, d_model, dense hidden
# Logits are O(1) here (init_std 0.2); fp32 rounding of the re-ordered sums is ~1e-6.
TOL = dict(rtol=1e-5, atol=2e-5)


def dense_model(seed: int = 0, n_layers: int = 2, **kw) -> MoGETransformer:
    """A dense model whose FFNs matter: weights of std 0.2, not the tiny default init."""
    cfg = ModelConfig(
        vocab_size=V, d_model=D, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=32,
        dense_hidden=F, first_dense_layers=n_layers, init_std=0.2, **kw,
    )  # fmt: skip
    unused = MoGEConfig(d_model=D, num_experts=2, num_groups=1, top_k=1, expert_hidden=8)
    torch.manual_seed(seed)
    return MoGETransformer(cfg, unused).eval()


def moe(**kw) -> MoGEConfig:
    base = dict(d_model=D, num_experts=8, num_groups=4, top_k=4, expert_hidden=F, aux_loss_coef=0.0)
    return MoGEConfig(**{**base, **kw})


def tokens(B: int = 2, L: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


# (id, MoGEConfig overrides): every exact family the plan supports.
CASES = [
    ("grouped-raw-copy-learned-scale", dict(learned_expert_scale=True)),
    ("grouped-raw-copy-scale-in-w_down", dict()),
    ("grouped-raw-slices-one-per-group", dict(expert_hidden=16, learned_expert_scale=True)),
    ("grouped-raw-slices-two-per-group-K2", dict(num_experts=16, top_k=8, expert_hidden=32)),
    (
        "grouped-raw-slices-shared",
        dict(
            num_experts=16,
            top_k=8,
            expert_hidden=16,
            num_shared_experts=1,
            shared_hidden=32,
            learned_expert_scale=True,
        ),
    ),  # fmt: skip
    ("grouped-raw-copy-shared", dict(expert_hidden=48, num_shared_experts=1, shared_hidden=16)),
    ("grouped-raw-sigmoid-route-scale", dict(expert_hidden=16, score_func="sigmoid", route_scale=2.5)),
    ("grouped-norm-copy", dict(normalize_weights=True, learned_expert_scale=True)),
    ("grouped-norm-slices", dict(num_experts=16, expert_hidden=16, normalize_weights=True)),
    (
        "grouped-norm-slices-K2-shared",
        dict(
            num_experts=16,
            top_k=8,
            expert_hidden=16,
            num_shared_experts=2,
            normalize_weights=True,
            route_scale=2.5,
        ),
    ),  # fmt: skip
    ("global-raw-copy", dict(router="global", top_k=2)),
    (
        "global-norm-copy-shared",
        dict(
            router="global",
            top_k=3,
            expert_hidden=32,
            num_shared_experts=1,
            shared_hidden=32,
            normalize_weights=True,
        ),
    ),  # fmt: skip
    ("group-limited-norm-copy", dict(router="group_limited", top_k=2, topk_groups=2, normalize_weights=True)),
    ("random-raw-slices", dict(router="random", expert_hidden=16, rre_vocab_size=V)),
    ("balance-bias-raw-slices", dict(expert_hidden=16, bias_update_rate=0.01)),
    (
        "shared-expert-gate",
        dict(
            num_experts=16,
            expert_hidden=8,
            num_shared_experts=1,
            shared_hidden=32,
            shared_expert_gate=True,
            normalize_weights=True,
        ),
    ),  # fmt: skip
]


@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_upcycled_logits_equal_the_dense_ones(overrides):
    dense = dense_model()
    x_BL = tokens()
    up, plan = upcycle_model(dense, moe(**overrides), seed=3)
    assert all(isinstance(b.ffn, MoGELayer) for b in up.blocks)
    out = up(x_BL)
    assert_close(out.logits, dense(x_BL).logits, **TOL)
    # Routed experts carry the FFN: without them the logits move far beyond the tolerance.
    for layer in up.moe_layers():
        layer.experts.w_down_EFD.data.zero_()
    assert (up(x_BL).logits - dense(x_BL).logits).abs().max() > 1e-2
    if plan.router_init != "uniform":  # the router does route: tokens disagree on experts
        assert len({tuple(r.tolist()) for r in out.routing[0].expert_ids}) > 1


def test_raw_gates_do_not_sum_to_one_and_the_scale_makes_up_for_it():
    """The paper's gates: K = 4 raw softmax scores of E = 16, each 1/16, summing to 1/4;
    the learned scale P / (K/E) = 16 makes each slice's gate 1 (P = 4 slices, one per group)."""
    up, plan = upcycle_model(dense_model(), moe(num_experts=16, expert_hidden=16, learned_expert_scale=True))
    routed = up(tokens()).routing[0]
    raw_TK = routed.scores.gather(1, routed.expert_ids)
    assert_close(raw_TK.sum(-1), torch.full((48,), 0.25))
    assert_close(routed.weights, torch.ones(48, 4))
    assert plan.num_slices == 4 and plan.expert_scale == 16.0
    assert_close(up.blocks[0].ffn.expert_scale_E.data, torch.full((16,), 16.0))


def test_every_token_gets_every_slice_once_under_grouped_routing():
    """Slice p fills groups p*M/P..: one expert per group means each slice exactly once."""
    up, plan = upcycle_model(dense_model(), moe(num_experts=16, expert_hidden=16, normalize_weights=True))
    ids_TK = up(tokens()).routing[0].expert_ids
    slices_TK = ids_TK.clone().apply_(plan.slice_of_expert)
    assert (slices_TK.sort(-1).values == torch.arange(4)).all()


def test_mixed_dense_and_moe_blocks_and_kv_cache_generation():
    dense = dense_model(n_layers=3)
    cfg = dataclasses.replace(dense.cfg, first_dense_layers=1, moe_every=2)
    up, _ = upcycle_model(dense, moe(expert_hidden=16), cfg)
    assert [type(b.ffn) for b in up.blocks] == [SwiGLU, MoGELayer, SwiGLU]
    x_BL = tokens(L=6)
    assert_close(up(x_BL).logits, dense(x_BL).logits, **TOL)
    assert torch.equal(up.generate(x_BL, 8, temperature=0), dense.generate(x_BL, 8, temperature=0))


def test_upcycling_leaves_the_dense_model_and_the_global_rng_alone():
    dense = dense_model()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    state = torch.get_rng_state()
    upcycle_model(dense, moe(expert_hidden=16, normalize_weights=True), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_router_seed_sets_the_random_rows():
    m = moe(normalize_weights=True)
    a = upcycle_model(dense_model(), m, seed=1)[0].blocks[0].ffn.router.weight
    b = upcycle_model(dense_model(), m, seed=1)[0].blocks[0].ffn.router.weight
    c = upcycle_model(dense_model(), m, seed=2)[0].blocks[0].ffn.router.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_replicated_router_repeats_the_rows_of_one_group():
    up, plan = upcycle_model(dense_model(), moe(num_experts=16, expert_hidden=16, normalize_weights=True))
    assert plan.router_init == "replicated"
    w_MGD = up.blocks[0].ffn.router.weight.reshape(4, 4, D)
    assert (w_MGD == w_MGD[:1]).all() and w_MGD[0].std() > 0


# --- what cannot be exact ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, router_init, fragments",
    [
        (dict(num_shared_experts=1, shared_hidden=64), "auto", ["shared_hidden:", "leaving none"]),
        (dict(expert_hidden=24), "auto", ["expert_hidden:", "do not split"]),
        (dict(router="global", expert_hidden=16), "auto", ["router:", "could miss a slice"]),
        (dict(num_experts=12, num_groups=4, expert_hidden=F // 3), "auto", []),  # 64 % 21: expert_hidden
        (dict(num_experts=16, expert_hidden=8), "auto", ["num_groups:", "8 does not divide"]),
        (dict(), "random", ["router_init:", "normalize_weights false"]),
        (dict(), "replicated", ["router_init:", "use uniform"]),
        (dict(expert_hidden=16, normalize_weights=True), "random", ["router_init:", "replicated"]),
        (
            dict(router="random", expert_hidden=16, rre_vocab_size=V, normalize_weights=True),
            "replicated",
            ["router_init:", "grouped router"],
        ),  # fmt: skip
        (dict(), "zeros", ["router_init:", "expected one of"]),
        (dict(capacity_factor=1.5), "auto", ["capacity_factor:", "would be dropped", ">= 2"]),
        (dict(capacity_factor=0.9, capacity_scope="group"), "auto", ["capacity_factor:", ">= 1"]),
    ],
)
def test_impossible_splits_raise_naming_the_field(overrides, router_init, fragments):
    with pytest.raises(ValueError) as err:
        plan_upcycle(F, moe(**overrides), router_init)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert str(err.value).split(":")[0] in (
        "shared_hidden",
        "expert_hidden",
        "router",
        "num_groups",
        "router_init",
        "capacity_factor",
    )


@pytest.mark.parametrize(
    "router, scope, need",
    [("grouped", "expert", 2.0), ("grouped", "group", 1.0), ("global", "expert", 2.0),
     ("global", "group", 2.0), ("random", "expert", 2.0), ("random", "group", 1.0)],
)  # fmt: skip
def test_a_capacity_is_accepted_exactly_where_no_slot_can_drop(router, scope, need):
    """E=8 in M=4 groups, K=4: the tied copies can send every token to one expert (cf >= E/K)
    or K'=1 (quota routers) / min(K, G)=2 (global) slots of it to one group."""
    kw = dict(router=router, capacity_scope=scope, rre_vocab_size=V)
    with pytest.raises(ValueError, match=rf"capacity_factor: .* use >= {need:g}"):
        plan_upcycle(F, moe(capacity_factor=need * 0.9, **kw))
    cfg = moe(capacity_factor=need, **kw)
    torch.manual_seed(0)
    dense = SwiGLU(D, F)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = MoGELayer(cfg)
    upcycle_ffn(
        dense, layer, plan_upcycle(F, cfg), router_std=0.5, generator=torch.Generator().manual_seed(0)
    )
    x_TD = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    out = layer(x_TD, token_ids=torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(2)))
    assert out.dropped is not None and int(out.dropped.sum()) == 0
    assert_close(out.hidden, dense(x_TD), rtol=1e-5, atol=1e-5)


def test_auto_picks_uniform_for_the_random_router_with_renormalised_slices():
    plan = plan_upcycle(F, moe(router="random", expert_hidden=16, rre_vocab_size=V, normalize_weights=True))
    assert plan.router_init == "uniform"


def test_source_with_moe_layers_is_refused():
    model = dense_model()
    half = MoGETransformer(dataclasses.replace(model.cfg, first_dense_layers=1), moe())
    with pytest.raises(ValueError, match="model.first_dense_layers: the source model has MoE layers"):
        upcycle_model(half, moe())


def test_model_config_that_changes_weight_shapes_is_refused():
    dense = dense_model()
    with pytest.raises(ValueError, match=r"embed.weight: the dense model has \(64, 32\)"):
        upcycle_model(dense, moe(), dataclasses.replace(dense.cfg, vocab_size=80, first_dense_layers=0))


@pytest.mark.parametrize(
    "change",
    [dict(rope_theta=500.0), dict(norm_eps=1e-2), dict(n_heads=8, n_kv_heads=4)],
    ids=["rope_theta", "norm_eps", "heads"],
)
def test_model_config_that_changes_the_function_with_the_same_shapes_is_refused(change):
    """8 heads of 4 and 4 kv heads of 4 give the projections of 4 heads of 8 and 2 kv heads of 8."""
    dense = dense_model()
    cfg = dataclasses.replace(dense.cfg, first_dense_layers=0, **change)
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf"model.{name}: {change[name]!r} differs from the dense model's"):
        upcycle_model(dense, moe(), cfg)
    same = dataclasses.replace(
        dense.cfg, first_dense_layers=0, max_seq_len=64, init_std=0.01, dense_hidden=None
    )
    with pytest.raises(ValueError, match="model.dense_hidden: 128"):  # None: 4 * d_model
        upcycle_model(dense, moe(), same)
    up, _ = upcycle_model(dense, moe(), dataclasses.replace(same, dense_hidden=F))
    assert_close(up(tokens()).logits, dense(tokens()).logits, **TOL)


# --- the layer-level rule, over many shapes ----------------------------------------


@st.composite
def layer_settings(draw):
    M = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([1, 2, 4]))
    K = M * draw(st.integers(1, G))
    Fe = draw(st.sampled_from([8, 16, 32]))
    Fs = draw(st.sampled_from([0, 8, 16]))
    kw = dict(
        num_experts=M * G, num_groups=M, top_k=K, expert_hidden=Fe,
        num_shared_experts=1 if Fs else 0, shared_hidden=Fs or None,
        router=draw(st.sampled_from(["grouped", "global", "random"])),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_weights=draw(st.booleans()), learned_expert_scale=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 2.5])), rre_vocab_size=V,
        shared_expert_gate=bool(Fs) and draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, None, 1.0, 2.0, 4.0, 16.0])),
        capacity_scope=draw(st.sampled_from(["expert", "group"])),
    )  # fmt: skip
    dense_hidden = Fs + Fe * draw(st.sampled_from([1, 2, 3, 4]))
    return dense_hidden, kw, draw(st.sampled_from(["auto", "auto", "uniform", "replicated", "random"]))


@settings(max_examples=60, deadline=None)
@given(layer_settings())
def test_every_plan_that_is_accepted_is_exact(case):
    """Either plan_upcycle refuses, or the layer equals the dense FFN on random inputs."""
    dense_hidden, kw, router_init = case
    cfg = MoGEConfig(d_model=16, aux_loss_coef=0.0, **kw)
    try:
        plan = plan_upcycle(dense_hidden, cfg, router_init)
    except ValueError:
        return
    torch.manual_seed(0)
    dense = SwiGLU(16, dense_hidden)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = MoGELayer(cfg)
    upcycle_ffn(dense, layer, plan, router_std=0.5, generator=torch.Generator().manual_seed(0))
    x_TD = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    token_ids = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(2))
    assert_close(layer(x_TD, token_ids=token_ids).hidden, dense(x_TD), rtol=1e-5, atol=1e-5)


# --- PanGu-Sigma's two-level router: fixed gates route_scale / K, a domain's groups only ---


@pytest.mark.parametrize(
    "domains, overrides, router_init",
    [
        ({"a": [0, 1], "b": [2, 3]}, dict(top_k=2), "auto"),  # raw gates: still route_scale / K each
        ({"a": [0, 1], "b": [2, 3]}, dict(top_k=2, route_scale=2.5), "random"),  # the router is never read
        ({"a": [0, 2], "b": [1, 3]}, dict(top_k=2, expert_hidden=32), "auto"),  # slices 0, 1 in both
        ({"a": [0, 1, 2, 3]}, dict(expert_hidden=16, normalize_weights=True), "auto"),
    ],
)
def test_two_level_router_upcycles_exactly(domains, overrides, router_init):
    cfg = moe(router="random", rre_vocab_size=V, rre_domain_groups=domains, **overrides)
    plan = plan_upcycle(F, cfg, router_init)
    assert plan.expert_scale == plan.num_slices / cfg.route_scale
    torch.manual_seed(0)
    dense = SwiGLU(D, F)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = MoGELayer(cfg)
    upcycle_ffn(dense, layer, plan, router_std=0.5, generator=torch.Generator().manual_seed(0))
    x_TD = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    token_ids = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(2))
    domain_ids = torch.arange(40) % len(domains)
    out = layer(x_TD, token_ids=token_ids, domain_ids=domain_ids).hidden
    assert_close(out, dense(x_TD), rtol=1e-5, atol=1e-5)


def test_two_level_router_refuses_domains_that_miss_a_slice():
    """Slices 0 and 1 fill groups {0, 1} and {2, 3}: domain a's tokens never reach slice 1."""
    cfg = moe(router="random", top_k=2, expert_hidden=32, rre_vocab_size=V,
              rre_domain_groups={"a": [0, 1], "b": [2, 3]})  # fmt: skip
    with pytest.raises(ValueError, match=r"rre_domain_groups: domain 'a' .* hold slices \[0, 0\]"):
        plan_upcycle(F, cfg)
