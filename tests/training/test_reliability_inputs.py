"""Reliability of tensor inputs: bad layer/model inputs, NaN/Inf checks, odd routing numbers.

Rows of docs/reliability.md name these tests.
Legend: T tokens, E experts, K experts per token, M groups, D d_model, B batch, L length, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from moge.layer import EXPERT_IMPLS, MoGEConfig, MoGELayer
from moge.model import MoGETransformer
from moge.model.config import ModelConfig
from moge.routing import RouterSettings, compute_scores, make_random_routing_table, route
from moge.testing import assert_group_quota

pytestmark = pytest.mark.usefixtures("one_thread")

# ================================================================================ inputs

LAYER = dict(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=8, num_shared_experts=1)


def make_layer(**kw) -> MoGELayer:
    torch.manual_seed(0)
    return MoGELayer(MoGEConfig(**{**LAYER, **kw}))


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 5, 15), "^d_model: "),
        (torch.randn(2, 5, 17), "^d_model: "),
        (torch.tensor(1.0), "^d_model: "),
        (torch.randint(0, 3, (2, 5, 16)), "^x: expected a floating-point tensor, got torch.int64"),
        (torch.zeros(2, 5, 16, dtype=torch.bool), "^x: expected a floating-point tensor, got torch.bool"),
        (torch.randn(2, 5, 16, dtype=torch.complex64), "^x: expected a floating-point tensor"),
    ],
    ids=["narrow", "wide", "scalar", "int", "bool", "complex"],
)
def test_layer_rejects_wrong_shapes_and_dtypes(x, match):
    with pytest.raises(ValueError, match=match):
        make_layer()(x)


def test_layer_rejects_token_ids_of_the_wrong_shape():
    layer = make_layer(router="random", rre_vocab_size=32)
    with pytest.raises(ValueError, match="^token_ids: "):
        layer(torch.randn(2, 5, 16), token_ids=torch.zeros(2, 4, dtype=torch.long))


def test_layer_rejects_float64_input_into_a_float32_layer():
    # Today: RuntimeError "expected m1 and m2 to have the same dtype" from inside the experts.
    with pytest.raises(ValueError, match="^x: .*float64"):
        make_layer()(torch.randn(2, 5, 16, dtype=torch.float64))


def test_layer_check_finite_names_the_input():
    layer = make_layer()
    layer.check_finite = True
    x = torch.randn(2, 5, 16)
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="^x: .*non-finite"):
        layer(x)


@pytest.mark.parametrize("impl", EXPERT_IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_layer_nan_input_stays_in_its_token(impl, bad):
    # Without a debug flag the layer does not check: a NaN/Inf token gets a NaN output
    # row (never a silently finite one), every other token is unaffected and the
    # routing of all tokens still meets the group quota.
    layer = make_layer(expert_impl=impl)
    x = torch.randn(2, 5, 16)
    clean = layer(x).hidden
    x[0, 1, 3] = bad
    out = layer(x)
    finite_BL = torch.isfinite(out.hidden).all(-1)
    expected = torch.ones(2, 5, dtype=torch.bool)
    expected[0, 1] = False
    assert torch.equal(finite_BL, expected)
    torch.testing.assert_close(out.hidden[finite_BL], clean[finite_BL])
    assert_group_quota(out.expert_ids, num_experts=8, num_groups=4, top_k=4)


V = 64


def make_model(**model_kw) -> MoGETransformer:
    torch.manual_seed(0)
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    moe = MoGEConfig(d_model=32, num_experts=8, num_groups=4, top_k=4, expert_hidden=16, num_shared_experts=1)
    return MoGETransformer(ModelConfig(**{**base, **model_kw}), moe)


@pytest.mark.parametrize(
    "tokens, targets, match",
    [
        ([[1, 2, 3]], None, "^tokens: expected a 2-D"),
        (torch.zeros(2, 3, 4, dtype=torch.long), None, "^tokens: expected a 2-D"),
        (torch.zeros(2, 4, dtype=torch.bool), None, "^tokens: expected integer"),
        (torch.zeros(2, 4), None, "^tokens: expected integer"),
        (torch.full((2, 4), V), None, r"^tokens: id 64 is outside the vocabulary \[0, 64\)"),
        (torch.zeros(2, 17, dtype=torch.long), None, "^tokens: length 17 exceeds the limit of 16"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), "^targets: expected integer"),
        (
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(2, 5, dtype=torch.long),
            r"^targets: shape \(2, 5\)",
        ),
        (torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -5), "^targets: id -5"),
    ],
    ids=[
        "list",
        "3d",
        "bool",
        "float",
        "out-of-vocab",
        "too-long",
        "float-targets",
        "targets-shape",
        "targets-id",
    ],
)
def test_model_rejects_bad_tokens_and_targets(tokens, targets, match):
    with pytest.raises(ValueError, match=match):
        make_model()(tokens, targets)


def _poison(model: MoGETransformer, name: str, value: float) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = value


@pytest.mark.parametrize(
    "param, value, where",
    [
        ("embed.weight", float("nan"), "embed"),
        ("embed.weight", float("inf"), "embed"),
        ("blocks.0.attn_norm.weight", float("nan"), "blocks.0.attn_norm"),
        ("blocks.0.attn.v_proj.weight", float("nan"), "blocks.0.attn"),
        ("blocks.1.attn.o_proj.weight", float("inf"), "blocks.1.attn"),
        ("blocks.1.ffn_norm.weight", float("nan"), "blocks.1.ffn_norm"),
        ("blocks.1.ffn.router.weight", float("nan"), r"blocks.1.ffn.router \(scores\)"),
        ("blocks.0.ffn.shared.w_down.weight", float("nan"), r"blocks.0.ffn \(routed \+ shared experts\)"),
        ("norm.weight", float("nan"), "norm"),
        ("lm_head.weight", float("inf"), r"lm_head \(logits\)"),
    ],
)
def test_model_check_finite_names_the_first_bad_module(param, value, where):
    model = make_model()
    x_BL = torch.arange(8).reshape(1, 8)
    clean = model(x_BL).logits
    model.check_finite = True
    assert torch.equal(model(x_BL).logits, clean), "the checks change no number"
    _poison(model, param, value)
    with pytest.raises(ValueError, match=f"^{where}: .*non-finite"):
        model(x_BL)


def test_model_check_finite_names_experts_and_dense_ffn():
    model = make_model(first_dense_layers=1)  # block 0 dense, block 1 MoE
    model.check_finite = True
    x_BL = torch.arange(8).reshape(1, 8)
    _poison(model, "blocks.0.ffn.w_down.weight", float("nan"))
    with pytest.raises(ValueError, match=r"^blocks\.0\.ffn \(dense\): "):
        model(x_BL)
    model = make_model()
    model.check_finite = True
    with torch.no_grad():
        for p in model.blocks[1].ffn.experts.parameters():
            p.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"^blocks\.1\.ffn \(routed \+ shared experts\): "):
        model(x_BL)


def test_model_check_finite_is_off_by_default():
    # The checks cost a host sync each: off unless asked for; a NaN weight then gives
    # NaN logits (and a NaN loss, which the trainer reports with the step and layer).
    model = make_model()
    assert model.check_finite is False
    _poison(model, "blocks.1.ffn.router.weight", float("nan"))
    assert not torch.isfinite(model(torch.arange(8).reshape(1, 8)).logits).any()


# ================================================================================ routing

E, M, K = 8, 4, 4
ROUTERS = ("grouped", "global", "group_limited", "random")
TABLE_VK = make_random_routing_table(32, E, M, K, seed=0)


def settings(router: str) -> RouterSettings:
    return RouterSettings(
        router=router, top_k=K, num_groups=M, topk_groups=2 if router == "group_limited" else None
    )


def route_all(scores_TE: torch.Tensor, router: str):
    tokens_T = torch.arange(scores_TE.shape[0]) % 32
    return route(scores_TE, settings(router), token_ids=tokens_T, table_VK=TABLE_VK)


def reference_ids(scores_TE: torch.Tensor, router: str) -> list[list[int]]:
    """Selections written out in Python: descending score, ties to the lower expert id."""
    out = []
    for t, row in enumerate(scores_TE.tolist()):
        rank = lambda ids: sorted(ids, key=lambda e: (-row[e], e))  # noqa: E731
        if router == "grouped":
            out.append([e for g in range(M) for e in rank(range(g * 2, g * 2 + 2))[: K // M]])
        elif router == "global":
            out.append(rank(range(E))[:K])
        elif router == "group_limited":
            top2 = [float(torch.tensor(row[g * 2 : g * 2 + 2]).sum()) for g in range(M)]  # float32, as routed
            groups = sorted(range(M), key=lambda g: (-top2[g], g))[:2]
            out.append(rank([e for g in groups for e in range(g * 2, g * 2 + 2)])[:K])
        else:
            out.append(TABLE_VK[t % 32].tolist())
    return out


def check_routing(scores_TE: torch.Tensor, router: str, weights_TK, ids_TK) -> None:
    T = scores_TE.shape[0]
    assert ids_TK.shape == (T, K) and ids_TK.dtype == torch.int64
    assert weights_TK.shape == (T, K) and weights_TK.dtype == torch.float32
    if router in ("grouped", "random"):
        assert_group_quota(ids_TK, num_experts=E, num_groups=M, top_k=K)
    assert all(len(set(r)) == K for r in ids_TK.tolist()), "K distinct experts per token"
    assert ids_TK.tolist() == reference_ids(scores_TE, router)
    assert torch.equal(weights_TK, scores_TE.gather(1, ids_TK))


def _logits(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "ties":  # pairs of equal logits inside and across groups
        return torch.tensor(
            [[1.0, 1.0, 0.5, 0.5, 2.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 3.0, 1.0, 1.0, 1.0, 1.0]]
        )
    if kind == "all_equal":
        return torch.full((5, E), 0.7)
    if kind == "huge":
        return torch.randn(16, E, generator=g) * 1e4
    if kind == "huge_negative":
        return -torch.rand(16, E, generator=g) * 1e4
    if kind == "tiny":
        return torch.randn(16, E, generator=g) * 1e-30
    if kind == "bf16":
        return torch.randn(16, E, generator=g).bfloat16()
    if kind == "minus_inf_group":  # both experts of group 1 masked out
        x = torch.randn(4, E, generator=g)
        x[:, 2:4] = float("-inf")
        return x
    if kind == "empty":
        return torch.zeros(0, E)
    raise KeyError(kind)


KINDS = ["ties", "all_equal", "huge", "huge_negative", "tiny", "bf16", "minus_inf_group", "empty"]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("router", ROUTERS)
def test_routing_odd_numbers_are_finite_exact_and_tie_to_lower_ids(router, kind, score_func):
    scores_TE = compute_scores(_logits(kind), score_func)
    assert scores_TE.dtype == torch.float32
    weights_TK, ids_TK = route_all(scores_TE, router)
    assert torch.isfinite(weights_TK).all()
    check_routing(scores_TE, router, weights_TK, ids_TK)


def test_all_equal_and_tiny_scores_pick_the_lowest_ids():
    for kind in ("all_equal", "tiny"):
        scores_TE = compute_scores(_logits(kind), "softmax")
        assert route_all(scores_TE, "grouped")[1].tolist()[0] == [0, 2, 4, 6], kind
        assert route_all(scores_TE, "global")[1].tolist()[0] == [0, 1, 2, 3], kind
        assert route_all(scores_TE, "group_limited")[1].tolist()[0] == [0, 1, 2, 3], kind


def test_bf16_logits_route_like_their_float32_values():
    logits = _logits("bf16")
    for router in ROUTERS:
        w16, ids16 = route_all(compute_scores(logits, "softmax"), router)
        w32, ids32 = route_all(compute_scores(logits.float(), "softmax"), router)
        assert torch.equal(ids16, ids32) and torch.equal(w16, w32), router


def test_masked_group_still_gets_its_quota_with_zero_weight():
    scores_TE = compute_scores(_logits("minus_inf_group"), "softmax")
    weights_TK, ids_TK = route_all(scores_TE, "grouped")
    assert (ids_TK[:, 1] == 2).all() and (weights_TK[:, 1] == 0).all()


@pytest.mark.parametrize("router", ROUTERS)
def test_nan_scores_give_nan_gates_not_silent_routing(router):
    # Decision: the router does not check (a host sync per layer); a token whose scores
    # hold NaN gets NaN gates, so the output and the loss turn NaN and the trainer stops
    # naming the layer (tests/training/test_train.py::test_nan_stops_with_step_and_layer_and_keeps_good_checkpoint).
    # Its ids stay valid and meet the quota; other tokens are untouched.
    scores_TE = compute_scores(torch.randn(6, E, generator=torch.Generator().manual_seed(2)), "softmax")
    clean_w, clean_ids = route_all(scores_TE, router)
    scores_TE[2, TABLE_VK[2, 0] if router == "random" else 0] = float("nan")  # a score the token uses
    weights_TK, ids_TK = route_all(scores_TE, router)
    assert torch.isnan(weights_TK[2]).any(), "a NaN score must reach the gates"
    others = torch.arange(6) != 2
    assert torch.equal(weights_TK[others], clean_w[others]) and torch.equal(ids_TK[others], clean_ids[others])
    assert ((ids_TK >= 0) & (ids_TK < E)).all()
    if router in ("grouped", "random"):
        assert_group_quota(ids_TK, num_experts=E, num_groups=M, top_k=K)
    # The usual case: a NaN logit makes the whole softmax row NaN.
    logits = torch.randn(3, E)
    logits[1, 5] = float("nan")
    w, ids = route_all(compute_scores(logits, "softmax"), router)
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2]]).all()


@pytest.mark.parametrize("router", ROUTERS)
def test_zero_tokens_through_the_layer(router):
    layer = make_layer(router=router, topk_groups=2 if router == "group_limited" else None,
                       rre_vocab_size=32 if router == "random" else None)  # fmt: skip
    out = layer(torch.zeros(0, 16), token_ids=torch.zeros(0, dtype=torch.long))
    assert out.hidden.shape == (0, 16) and out.expert_ids.shape == (0, K) and out.weights.shape == (0, K)
    assert int(out.load.sum()) == 0 and torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)
