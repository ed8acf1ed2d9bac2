import dataclasses

import pytest
import torch
from reference import all_grads, reference_layer, within_bf16_error
from torch.testing import assert_close

import moge
from moge import MoGEConfig, MoGELayer
from moge.balance import load_balancing_loss, router_z_loss
from moge.kernels import precision
from moge.testing import assert_group_quota

BASE = dict(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=12)


def make(**kw):
    torch.manual_seed(0)
    return MoGELayer(MoGEConfig(**{**BASE, **kw}))


# --- public API -----------------------------------------------------------------------


def test_public_names_and_config_fields():
    assert moge.MoGEConfig is MoGEConfig and moge.MoGELayer is MoGELayer
    names = {f.name for f in dataclasses.fields(MoGEConfig)}
    for field in ("d_model", "num_experts", "num_groups", "top_k", "expert_hidden", "num_shared_experts",
                  "shared_hidden", "router", "score_func", "normalize_weights", "route_scale",
                  "learned_expert_scale", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):  # fmt: skip
        assert field in names
    c = MoGEConfig(**BASE)
    assert (c.num_shared_experts, c.shared_hidden, c.router, c.score_func) == (0, None, "grouped", "softmax")
    assert (c.normalize_weights, c.route_scale, c.learned_expert_scale) == (False, 1.0, False)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(num_groups=3), "num_groups"),
        (dict(top_k=6), "top_k"),
        (dict(top_k=12, num_groups=1), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(d_model=-1), "d_model"),
        (dict(expert_hidden=2.5), "expert_hidden"),
        (dict(router="hash"), "router"),
        (dict(score_func="relu"), "score_func"),
        (dict(route_scale=0.0), "route_scale"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        (dict(aux_loss_type="token"), "aux_loss_type"),
        (dict(router="group_limited"), "topk_groups"),
        (dict(router="group_limited", topk_groups=5), "topk_groups"),
        (dict(router="random"), "rre_vocab_size"),
        (dict(normalize_weights="yes"), "normalize_weights"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(expert_impl="cuda"), "expert_impl"),
        (dict(num_shared_experts=0, shared_hidden=32), "shared_hidden"),
        (dict(num_shared_experts=0, shared_expert_gate=True), "shared_expert_gate"),
    ],
)
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        MoGEConfig(**{**BASE, **kw})


def test_wrong_input_width_names_d_model():
    with pytest.raises(ValueError, match="d_model"):
        make()(torch.randn(3, 15))
    with pytest.raises(ValueError, match="floating"):
        make()(torch.ones(3, 16, dtype=torch.long))


def test_output_fields_and_shapes():
    out = make()(torch.randn(2, 5, 16))
    assert isinstance(out, moge.MoGEOutput)
    assert out.hidden.shape == (2, 5, 16)
    assert out.expert_ids.shape == out.weights.shape == (10, 4)
    assert out.expert_ids.dtype == torch.int64 and out.weights.dtype == torch.float32
    assert out.load.shape == (8,) and out.load.sum() == 40
    assert out.scores.shape == (10, 8) and out.aux_loss.dim() == 0
    assert_group_quota(out.expert_ids, num_experts=8, num_groups=4, top_k=4)


# --- the fast path against the plain reference --------------------------------------------


CASES = [
    dict(),
    dict(num_shared_experts=2, learned_expert_scale=True),
    dict(router="global", normalize_weights=True, route_scale=2.5),
    dict(router="group_limited", topk_groups=2, score_func="sigmoid", normalize_weights=True),
    dict(shared_hidden=20, num_shared_experts=1, expert_impl="grouped_mm"),
    dict(top_k=8, num_groups=8),
]


@pytest.mark.parametrize("kw", CASES)
def test_layer_matches_reference_forward_and_backward_float32(kw):
    layer = make(**kw)
    if layer.expert_scale_E is not None:
        with torch.no_grad():
            layer.expert_scale_E.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    fast = all_grads(layer, x, lambda x: layer(x).hidden)
    ref = all_grads(layer, x, lambda x: reference_layer(layer, x)[0])
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        assert_close(a, b)


def test_layer_matches_reference_bfloat16():
    layer = make(num_shared_experts=1, learned_expert_scale=True).to(torch.bfloat16)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    out = layer(x)
    assert out.hidden.dtype == torch.bfloat16 and out.scores.dtype == torch.float32
    ref, ref_ids = reference_layer(layer, x)
    torch.testing.assert_close(out.expert_ids, ref_ids)
    fast = all_grads(layer, x, lambda x: layer(x).hidden)
    slow = all_grads(layer, x, lambda x: reference_layer(layer, x)[0])
    exact_layer = make(num_shared_experts=1, learned_expert_scale=True)
    exact_layer.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    exact = all_grads(exact_layer, x.float(), lambda x: reference_layer(exact_layer, x)[0])
    assert torch.equal(reference_layer(exact_layer, x.float())[1], ref_ids)  # the same routing
    names = ["y", "dx"] + [n for n, _ in layer.named_parameters()]
    within_bf16_error(fast, slow, exact, names)


def test_random_router_uses_token_ids():
    layer = make(router="random", rre_vocab_size=50, rre_seed=3)
    x = torch.randn(2, 6, 16)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    out = layer(x, token_ids=tokens)
    torch.testing.assert_close(out.expert_ids, layer.rre_table_VK[tokens.reshape(-1)])
    assert_close(out.hidden, reference_layer(layer, x, tokens)[0])
    with pytest.raises(ValueError, match="token_ids"):
        layer(x)
    with pytest.raises(ValueError, match="token_ids"):
        layer(x, token_ids=tokens[:, :3])


# --- router precision, autocast ------------------------------------------------------------


def test_router_in_float32_under_autocast():
    layer = make()
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.scores.dtype == torch.float32 and out.hidden.dtype == torch.bfloat16
    assert_close(out.scores, (x @ layer.router.weight.T).softmax(-1))


@pytest.mark.parametrize("native", [True, False])
def test_a_float32_router_beside_bfloat16_experts_takes_bfloat16_inputs(monkeypatch, native):
    """As transformers keeps DeepSeek-V3's gate.weight float32 in a bf16 model: the
    layer's bf16 input is accepted and routed exactly as by a bf16 router holding the
    same (bf16-representable) weights, whose logits are float32 too. native: whether the
    CPU counts as having bf16 matrix instructions."""
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: native)
    layer = make(num_shared_experts=1, learned_expert_scale=True).to(torch.bfloat16)
    mixed = make(num_shared_experts=1, learned_expert_scale=True).to(torch.bfloat16)
    mixed.load_state_dict(layer.state_dict())
    mixed.router.float()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    ref, out = layer(x), mixed(x)
    assert out.hidden.dtype == torch.bfloat16 and mixed.router.weight.dtype == torch.float32
    for name in ("hidden", "expert_ids", "weights", "scores", "lb_loss"):
        assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=0, msg=name)
    (ref.hidden.float().pow(2).sum() + ref.aux_loss).backward()
    (out.hidden.float().pow(2).sum() + out.aux_loss).backward()
    # Gradients: the float32 weight's from float32 products; the bf16 one's, where bf16
    # products are native, from bf16 products of the logits' rounded gradient
    # (precision._Float32Linear): within 2x the bf16 rounding of the float32 one.
    exact, got = mixed.router.weight.grad, layer.router.weight.grad
    if native:
        rounding = (exact.bfloat16().float() - exact).abs().max()
        assert 0 < (got.float() - exact).abs().max() <= 2 * rounding
    else:
        assert_close(exact.bfloat16(), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^x: dtype torch.float16 differs from the layer's parameters "
                                         r"\(experts torch.bfloat16, router torch.float32\)"):  # fmt: skip
        mixed(x.half())
    with pytest.raises(ValueError, match=r"^x: dtype torch.float32 differs .* \(torch.bfloat16\)"):
        layer(x.float())
    # The router's float32 does not admit a float32 x: the bf16 experts could not take it.
    with pytest.raises(
        ValueError, match=r"^x: dtype torch.float32 differs .* \(experts torch.bfloat16, router"
    ):
        mixed(x.float())


# --- losses --------------------------------------------------------------------------------------


def test_aux_loss_is_weighted_sum():
    layer = make(aux_loss_coef=0.01, z_loss_coef=0.001)
    out = layer(torch.randn(20, 16))
    assert_close(out.lb_loss, load_balancing_loss(out.scores, out.expert_ids, 8))
    assert_close(out.aux_loss, 0.01 * out.lb_loss + 0.001 * out.z_loss)
    x = torch.randn(20, 16)
    assert_close(layer(x).z_loss, router_z_loss(x @ layer.router.weight.T))


@pytest.mark.parametrize("aux_loss_type", ["batch", "sequence"])
def test_sigmoid_balance_loss_uses_each_tokens_normalised_scores(aux_loss_type):
    """DeepSeek-V3's balance loss: p from s / sum(s) per token, so 1.0 at balance, and
    scaling every score down (a sigmoid router can) does not lower it."""
    layer = make(router="group_limited", topk_groups=2, score_func="sigmoid", normalize_weights=True,
                 aux_loss_type=aux_loss_type)  # fmt: skip
    x = torch.randn(3, 20, 16)
    out = layer(x)
    shares = out.scores / out.scores.sum(dim=-1, keepdim=True)
    ids = out.expert_ids.view(3, 20, -1)
    if aux_loss_type == "batch":
        expected = load_balancing_loss(shares, out.expert_ids, 8)
    else:
        expected = torch.stack(
            [load_balancing_loss(s, i, 8) for s, i in zip(shares.view(3, 20, 8), ids)]
        ).mean()
    assert_close(out.lb_loss, expected)
    assert not torch.allclose(out.lb_loss, load_balancing_loss(out.scores, out.expert_ids, 8))


def test_z_loss_is_reported_when_off_but_adds_no_gradient():
    x = torch.randn(20, 16)
    off, on = make(aux_loss_coef=0.0, z_loss_coef=0.0), make(aux_loss_coef=0.0, z_loss_coef=0.5)
    out_off, out_on = off(x), on(x)
    assert_close(out_off.z_loss, router_z_loss(x @ off.router.weight.T))  # still reported
    assert not out_off.z_loss.requires_grad and out_on.z_loss.requires_grad
    out_on.aux_loss.backward()
    assert on.router.weight.grad.abs().sum() > 0  # on: the z-loss trains the router


def test_aux_loss_trains_the_router_toward_balance():
    layer = make(aux_loss_coef=1.0, router="global")
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # a router biased toward expert 0
    opt = torch.optim.SGD([layer.router.weight], lr=0.5)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) + 1.0  # shared direction
    first = layer(x).lb_loss.item()
    for _ in range(50):
        opt.zero_grad()
        layer(x).aux_loss.backward()
        opt.step()
    assert layer(x).lb_loss.item() < first - 0.05


def test_sequence_aux_loss_uses_sequences():
    layer = make(aux_loss_type="sequence")
    x = torch.randn(3, 5, 16)
    out = layer(x)
    per_seq = torch.stack(
        [
            load_balancing_loss(out.scores.view(3, 5, 8)[b], out.expert_ids.view(3, 5, 4)[b], 8)
            for b in range(3)
        ]
    )
    assert_close(out.lb_loss, per_seq.mean())


def test_global_batch_loss_accumulates_until_end_step():
    layer = make(aux_loss_type="global_batch")
    x1, x2 = torch.randn(10, 16), torch.randn(10, 16)
    out1 = layer(x1)
    assert_close(out1.lb_loss, load_balancing_loss(out1.scores, out1.expert_ids, 8))
    out2 = layer(x2)
    ids = torch.cat([out1.expert_ids, out2.expert_ids])
    counts = torch.bincount(ids.flatten(), minlength=8).float()
    expected = (counts * 8 / (4 * 20) * out2.scores.mean(0)).sum()
    assert_close(out2.lb_loss, expected)
    layer.end_step()
    out3 = layer(x2)
    assert_close(out3.lb_loss, load_balancing_loss(out3.scores, out3.expert_ids, 8))
    layer.eval()  # evaluation never accumulates
    assert_close(layer(x1).lb_loss, out1.lb_loss)


def test_expert_scale_is_learned():
    layer = make(learned_expert_scale=True)
    assert_close(layer.expert_scale_E.detach(), torch.ones(8))
    with torch.no_grad():  # away from 1, so a scale that is ignored would show
        layer.expert_scale_E.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(10, 16)
    out = layer(x)
    assert_close(out.hidden, reference_layer(layer, x)[0], rtol=1e-5, atol=1e-6)
    out.hidden.pow(2).sum().backward()
    grad = layer.expert_scale_E.grad.clone()
    layer.zero_grad()
    reference_layer(layer, x)[0].pow(2).sum().backward()  # the plain formula's gradient
    assert grad.abs().min() > 0
    assert_close(grad, layer.expert_scale_E.grad, rtol=1e-4, atol=1e-7)


def test_shared_expert_added_unweighted():
    layer = make(num_shared_experts=2)
    assert layer.shared.hidden == 24  # 2 x expert_hidden
    x = torch.randn(6, 16)
    out = layer(x)
    routed = layer.experts(x, out.expert_ids, out.weights)
    assert_close(out.hidden, routed + layer.shared(x))


# --- aux-loss-free bias ---------------------------------------------------------------------------


def test_bias_shifts_selection_not_weights_and_updates_once_per_step():
    layer = make(bias_update_rate=0.1)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(4))
    out = layer(x)
    assert_close(layer.balance_bias_E, torch.zeros(8))
    layer(x)  # second micro-batch of the same step
    layer.end_step()
    load = 2 * out.load.float()
    expected = torch.sign(load.mean() - load) * 0.1
    assert_close(layer.balance_bias_E, expected - expected.mean())
    out2 = layer(x)
    assert_close(out2.weights, out2.scores.gather(1, out2.expert_ids))  # gates stay unbiased
    assert_group_quota(out2.expert_ids, num_experts=8, num_groups=4, top_k=4)
    assert "balance_bias_E" in layer.state_dict() and "load_accum_E" not in layer.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_balance_bias_stays_float32_in_a_half_precision_layer(dtype):
    """`.to(bf16)` / `.half()` keep the bias float32 and its values: bf16 steps are 2e-3
    at |bias| 0.3, which would round every sign-rule step of 1e-4 away."""
    layer = make(bias_update_rate=1e-4)
    with torch.no_grad():
        layer.balance_bias_E.copy_(torch.linspace(-0.3, 0.3, 8) + 1e-4)
    bias_E = layer.balance_bias_E.clone()
    for low in (make(bias_update_rate=1e-4).to(dtype), make(bias_update_rate=1e-4).half().to(dtype)):
        low.load_state_dict(layer.state_dict())
        assert low.router.weight.dtype == dtype and low.balance_bias_E.dtype == torch.float32
        assert_close(low.balance_bias_E, bias_E, rtol=0, atol=0)
    low = layer.to(dtype)
    assert low.router.weight.dtype == dtype and low.balance_bias_E.dtype == torch.float32
    assert_close(low.balance_bias_E, bias_E, rtol=0, atol=0)
    with torch.no_grad():
        out = low(torch.randn(40, 16, generator=torch.Generator().manual_seed(4)).to(dtype))
    low.end_step()
    load_E = out.load.float()
    step_E = torch.sign(load_E.mean() - load_E) * 1e-4
    assert step_E.abs().sum() > 0
    expected_E = bias_E + step_E
    assert_close(low.balance_bias_E, expected_E - expected_E.mean(), rtol=0, atol=1e-6)
    assert low.float().balance_bias_E.dtype == torch.float32  # float64 too: not narrower
    assert low.double().balance_bias_E.dtype == torch.float64


def test_end_step_without_forward_keeps_bias():
    layer = make(bias_update_rate=0.1)
    layer.end_step()
    assert_close(layer.balance_bias_E, torch.zeros(8))


# --- edge cases ----------------------------------------------------------------------------------


def test_zero_tokens():
    layer = make(num_shared_experts=1)
    x = torch.zeros(0, 16, requires_grad=True)
    out = layer(x)
    assert out.hidden.shape == (0, 16) and out.expert_ids.shape == (0, 4)
    assert out.aux_loss.item() == 0.0 and out.load.sum() == 0
    (out.hidden.sum() + out.aux_loss).backward()


def test_meta_build_then_to_empty_and_reset_parameters_gives_the_fresh_buffers():
    """The usual meta-device recipe (build on meta, to_empty, reset_parameters) leaves no
    buffer holding what to_empty allocated: the random router's table, the load counts
    and the balance bias are a fresh layer's."""
    kw = dict(router="random", rre_vocab_size=50, rre_seed=3, bias_update_rate=0.1)
    fresh = make(**kw)
    with torch.device("meta"):
        layer = MoGELayer(MoGEConfig(**{**BASE, **kw}))
    layer.to_empty(device="cpu")
    for buf in layer.buffers():
        buf.fill_(7)  # to_empty's memory holds any bits; 7 is a valid expert id
    layer.reset_parameters()
    expected = dict(fresh.named_buffers())
    assert sorted(dict(layer.named_buffers())) == sorted(expected)
    for name, buf in layer.named_buffers():
        assert buf.device.type == "cpu" and buf.dtype == expected[name].dtype, name
        assert_close(buf, expected[name], rtol=0, atol=0, msg=name)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    out = layer(torch.randn(2, 6, 16), token_ids=tokens)
    assert_close(out.expert_ids, fresh.rre_table_VK[tokens.reshape(-1)], rtol=0, atol=0)
    assert int(out.load.sum()) == 12 * 4 and int(layer.load_accum_E.sum()) == 12 * 4


def hidden_and_aux_loss(layer, x, tokens):
    """(hidden [..., D], aux loss) of a training call of a MoGELayer or a MoGEMLP."""
    out = layer(x, token_ids=tokens)
    if isinstance(out, torch.Tensor):
        return out, moge.aux_loss(layer)
    return out.hidden, out.aux_loss


@pytest.mark.parametrize("cls", [MoGELayer, moge.MoGEMLP])
def test_load_state_dict_with_assign_into_a_meta_build_trains_as_the_eager_layer(cls):
    """load_state_dict(sd, assign=True) takes the parameters and the balance bias from sd;
    the buffers no state dict carries (the load counts, the random router's table) were
    left on meta. They are made on the loaded device: steps then match bit for bit."""
    kw = dict(router="random", rre_vocab_size=50, bias_update_rate=0.1, aux_loss_type="global_batch")
    cfg = MoGEConfig(**{**BASE, **kw, "num_shared_experts": 1})
    torch.manual_seed(0)
    eager = cls(cfg)
    gen = torch.Generator().manual_seed(2)
    x, tokens = torch.randn(2, 6, 16, generator=gen), torch.randint(0, 50, (2, 6), generator=gen)
    hidden_and_aux_loss(eager, x, tokens)
    eager.end_step()
    assert eager.balance_bias_E.abs().sum() > 0  # the state dict carries a bias that is not 0
    with torch.device("meta"):
        layer = cls(cfg)
    layer.load_state_dict(eager.state_dict(), assign=True)
    for name, buf in eager.named_buffers():
        assert_close(layer.get_buffer(name), buf, rtol=0, atol=0, msg=name)
    for _ in range(2):  # the counts feed the global-batch loss, then the bias
        got, want = hidden_and_aux_loss(layer, x, tokens), hidden_and_aux_loss(eager, x, tokens)
        assert_close(got, want, rtol=0, atol=0)
        layer.end_step()
        eager.end_step()
        assert_close(layer.balance_bias_E, eager.balance_bias_E, rtol=0, atol=0)


def test_reset_parameters_on_every_submodule_as_fsdp_materialises_a_meta_model():
    """FSDP's meta-device materialisation (and `model.apply`-style loops) call
    reset_parameters() with no argument on every module that holds parameters, the
    experts module included: they get the layer's init_std, as the layer's own reset gives."""
    kw = dict(init_std=0.5, num_shared_experts=1, expert_hidden=64)
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), moge.MoGEMLP(MoGEConfig(**{**BASE, **kw})))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)) and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    experts = model[1].experts
    for w in (experts.w_gate_up_EDH, experts.w_down_EFD):
        assert_close(w.std().item(), kw["init_std"], rtol=0.05, atol=0)
    assert torch.isfinite(model(torch.randn(2, 3, 16))).all()


# Every kind of parameter and buffer the layer holds; d_model 128 so that the smallest random
# weight (shared_expert_gate, [1, 128]) gives a sample std within ~10% of the true one.
INIT_KW = dict(
    d_model=128, num_experts=8, num_groups=4, top_k=4, expert_hidden=16, num_shared_experts=1,
    shared_expert_gate=True, learned_expert_scale=True, bias_update_rate=0.1, router="random",
    rre_vocab_size=50, init_std=0.3,
)  # fmt: skip


def reset_module_by_module(module, parents_first: bool) -> None:
    """reset_parameters() on every module that has one: parents first (`for m in
    model.modules()`, FSDP's materialisation) or children first (as `model.apply`)."""
    modules = list(module.modules())
    for m in modules if parents_first else reversed(modules):
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


@pytest.mark.parametrize("cls", [MoGELayer, moge.MoGEMLP])
@pytest.mark.parametrize("parents_first", [True, False])
def test_module_by_module_reset_of_a_meta_build_gives_the_layers_own_init(cls, parents_first):
    """Every weight N(0, init_std) (a plain nn.Linear's reset drew Kaiming-uniform, std
    1/sqrt(3*128) = 0.05, for the router and the shared experts), the expert scale 1 and
    the buffers (balance bias 0, counts, the random router's table) an eager build's."""
    cfg = MoGEConfig(**INIT_KW)
    torch.manual_seed(0)
    eager = cls(cfg)
    with torch.device("meta"):
        layer = cls(cfg)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*layer.parameters(), *layer.buffers()]:
            t.fill_(7)  # to_empty's memory holds any bits
    torch.manual_seed(1)
    reset_module_by_module(layer, parents_first)
    want = dict(eager.named_parameters())
    for name, p in layer.named_parameters():
        if name == "expert_scale_E":
            assert_close(p, want[name], rtol=0, atol=0)
            continue
        # The sample std's own spread is std / sqrt(2 N): 4 of those at most.
        tol = 4 / (2 * p.numel()) ** 0.5
        assert abs(p.std().item() / cfg.init_std - 1) < tol, (name, p.std().item())
        assert abs(want[name].std().item() / cfg.init_std - 1) < tol, name  # what eager gives
    for name, buf in eager.named_buffers():
        assert_close(layer.get_buffer(name), buf, rtol=0, atol=0, msg=name)


# --- the fused path's chunks are the groups ------------------------------------------------------


def test_fused_chunks_are_groups_and_combine_by_gather():
    from moge.kernels.fused_plan import columns_per_chunk

    layer = make(num_experts=8, num_groups=2, top_k=4)
    assert layer.experts.experts_per_chunk == 4
    x = torch.randn(33, 16, generator=torch.Generator().manual_seed(7))
    out = layer.route_tokens(x, None, (33,))
    # Grouped routing fills columns group by group, so chunks combine with gathers.
    assert columns_per_chunk(out.expert_ids, 4, 8) == 2
    fast = all_grads(layer, x, lambda x: layer(x).hidden)
    ref = all_grads(layer, x, lambda x: reference_layer(layer, x)[0])
    for a, b in zip(fast, ref):
        assert_close(a, b)


def test_route_tokens_is_forward_without_experts():
    layer = make(num_shared_experts=1)
    x = torch.randn(2, 9, 16)
    full = layer(x)
    routed = layer.route_tokens(x.reshape(-1, 16), None, (2, 9))
    for name in ("expert_ids", "weights", "load", "scores", "lb_loss", "z_loss", "aux_loss"):
        torch.testing.assert_close(getattr(routed, name), getattr(full, name))


def test_a_float64_layer_stays_float64_under_bf16_autocast():
    """Autocast leaves float64 alone (as torch's own ops do), shared expert included."""
    torch.manual_seed(0)
    cfg = MoGEConfig(d_model=16, num_experts=4, num_groups=2, top_k=2, expert_hidden=8, num_shared_experts=1)
    layer = MoGELayer(cfg).double().eval()
    x = torch.randn(5, 16, dtype=torch.float64)
    plain = layer(x).hidden
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = layer(x).hidden
    assert under.dtype == torch.float64
    assert_close(under, plain, atol=0, rtol=0)


def test_grouped_mm_refuses_float64_with_a_value_error():
    cfg = MoGEConfig(
        d_model=16, num_experts=4, num_groups=2, top_k=2, expert_hidden=8, expert_impl="grouped_mm"
    )
    layer = MoGELayer(cfg).double()
    with pytest.raises(ValueError, match="expert_impl: grouped_mm .* not float64; use fused or loop"):
        layer(torch.randn(64, 16, dtype=torch.float64))


@pytest.mark.parametrize("impl", ["fused", "loop"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(learned_expert_scale=True, num_shared_experts=1),
        dict(router="global", top_k=2, normalize_weights=True),
        dict(router="group_limited", topk_groups=2, score_func="sigmoid", route_scale=2.5),
    ],
)
def test_a_float64_layer_passes_gradcheck(impl, kw):
    """Router logits, scores and gates stay float64 in a float64 layer, so the whole
    layer's gradient (input, router, expert weights, expert scale) passes finite differences."""
    torch.manual_seed(0)
    cfg = MoGEConfig(**{**BASE, "d_model": 8, "expert_hidden": 6, "expert_impl": impl, **kw})
    layer = MoGELayer(cfg).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)

    def hidden(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,)).hidden

    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    out = layer(x)
    assert out.scores.dtype == out.weights.dtype == torch.float64
    assert torch.autograd.gradcheck(hidden, (x, *params))
