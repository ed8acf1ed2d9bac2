"""MoGEMLP as a drop-in MLP, the model-level helpers, and the forgotten end_step() warning."""

import warnings

import pytest
import torch
from torch import nn

import moge
from moge import EndStepWarning, MoGEConfig, MoGELayer, MoGEMLP

CFG = dict(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=8, aux_loss_coef=0.01)


class HFStyleBlock(nn.Module):
    """A block in the shape of Hugging Face decoders: `self.mlp` must return a tensor."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.mlp = mlp

    def forward(self, hidden_states):
        return hidden_states + self.mlp(self.norm(hidden_states))


def test_mlp_returns_the_typed_layers_hidden_and_aux_loss():
    torch.manual_seed(0)
    typed = MoGELayer(MoGEConfig(**CFG))
    mlp = MoGEMLP(MoGEConfig(**CFG))
    mlp.load_state_dict(typed.state_dict())
    x = torch.randn(2, 5, 16)
    out = typed(x)
    y = mlp(x)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    torch.testing.assert_close(y, out.hidden, rtol=0, atol=0)
    torch.testing.assert_close(moge.aux_loss(mlp), out.aux_loss, rtol=0, atol=0)
    assert torch.equal(mlp.last.expert_ids, out.expert_ids) and torch.equal(mlp.last.load, out.load)


def test_released_losses_of_layers_with_other_settings_pool_apart():
    """Released-loss layers pool their rows as the released code does, but only with
    layers of the same experts, top_k and coefficients: 8 and 16 experts cannot share one."""
    released = {**CFG, "aux_loss_type": "released"}
    kinds = [
        dict(released),
        dict(released),
        {**released, "num_experts": 16, "top_k": 8, "aux_loss_coef": 0.02},
    ]
    torch.manual_seed(0)
    model = nn.Sequential(*(HFStyleBlock(MoGEMLP(MoGEConfig(**k))) for k in kinds))
    model(torch.randn(2, 5, 16))
    outs = [block.mlp.pending_aux_losses[-1] for block in model]
    expected = moge.layer.total_aux_loss(outs[:2], model[0].mlp.config) + moge.layer.total_aux_loss(
        outs[2:], model[2].mlp.config
    )
    torch.testing.assert_close(moge.aux_loss(model), expected, rtol=1e-6, atol=0)


def test_a_copy_with_losses_pending_takes_the_layer_not_the_losses():
    """deepcopy (AveragedModel makes one) and pickle of an MLP whose aux losses were not
    collected yet: the graphs they hold cannot be copied, and they stay the original's."""
    import copy
    import pickle

    torch.manual_seed(0)
    mlp = MoGEMLP(MoGEConfig(**CFG))
    x = torch.randn(2, 5, 16)
    mlp(x)
    twin = copy.deepcopy(mlp)
    loaded = pickle.loads(pickle.dumps(mlp))  # the bytes this test just made
    assert len(mlp.pending_aux_losses) == 1
    for other in (twin, loaded):
        assert other.pending_aux_losses == []
        torch.testing.assert_close(other(x), mlp(x), rtol=0, atol=0)
    torch.optim.swa_utils.AveragedModel(mlp)


def test_mlp_takes_the_domain_ids_of_a_two_level_random_router():
    """With rre_domain_groups the layer needs domain_ids; the MLP passes them on as the
    typed layer takes them (the third argument, or by keyword)."""
    cfg = MoGEConfig(**{**CFG, "top_k": 2, "router": "random", "rre_vocab_size": 50,
                        "rre_domain_groups": {"code": [0, 1], "text": [2, 3]}})  # fmt: skip
    torch.manual_seed(0)
    typed = MoGELayer(cfg)
    mlp = MoGEMLP(cfg)
    mlp.load_state_dict(typed.state_dict())
    x = torch.randn(2, 5, 16)
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    domains = torch.tensor([[0] * 5, [1] * 5])
    out = typed(x, tokens, domains)
    torch.testing.assert_close(mlp(x, tokens, domains), out.hidden, rtol=0, atol=0)
    torch.testing.assert_close(mlp.last.expert_ids, out.expert_ids, rtol=0, atol=0)
    torch.testing.assert_close(mlp(x, token_ids=tokens, domain_ids=domains), out.hidden, rtol=0, atol=0)
    assert mlp.last.expert_ids[:5].lt(4).all() and mlp.last.expert_ids[5:].ge(4).all()  # each domain's groups
    with pytest.raises(ValueError, match="^domain_ids: "):
        mlp(x, tokens)


def test_in_sequential_and_hf_block_the_aux_loss_reaches_the_router():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), HFStyleBlock(MoGEMLP(MoGEConfig(**CFG))),
                          HFStyleBlock(MoGEMLP(MoGEConfig(**CFG))), nn.Linear(16, 1))  # fmt: skip
    x = torch.randn(3, 4, 16)
    model(x)
    aux = moge.aux_loss(model)
    layers = moge.moge_layers(model)
    assert [name for name, _ in layers] == ["1.mlp", "2.mlp"]
    expected = sum(CFG["aux_loss_coef"] * (m.last.lb_loss) for _, m in layers)
    torch.testing.assert_close(aux, expected, rtol=1e-6, atol=0)
    aux.backward()
    for _, m in layers:
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    assert moge.aux_loss(model).item() == 0.0, "collected losses are cleared"


def test_aux_loss_sums_gradient_accumulation_micro_batches():
    torch.manual_seed(0)
    mlp = MoGEMLP(MoGEConfig(**CFG))
    x1, x2 = torch.randn(6, 16), torch.randn(6, 16)
    mlp(x1)
    lb1 = mlp.last.lb_loss
    mlp(x2)
    lb2 = mlp.last.lb_loss
    torch.testing.assert_close(moge.aux_loss(mlp), CFG["aux_loss_coef"] * (lb1 + lb2), rtol=1e-6, atol=0)


def test_nothing_pending_in_eval_mode_or_without_grad():
    mlp = MoGEMLP(MoGEConfig(**CFG))
    mlp.eval()
    mlp(torch.randn(4, 16))
    assert mlp.pending_aux_losses == [] and mlp.last is not None
    mlp.train()
    with torch.no_grad():
        mlp(torch.randn(4, 16))
    assert mlp.pending_aux_losses == []
    assert moge.aux_loss(mlp).item() == 0.0


def test_helpers_on_a_model_without_moge_layers():
    with pytest.raises(ValueError, match="no MoGE layer found in Linear"):
        moge.aux_loss(nn.Linear(2, 2))
    assert moge.end_step(nn.Linear(2, 2)) == 0
    assert moge.routing_stats(nn.Linear(2, 2)) == {}


def test_routing_stats_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(MoGEMLP(MoGEConfig(**CFG)), MoGEMLP(MoGEConfig(**CFG)))
    assert moge.routing_stats(model) == {}
    model(torch.randn(10, 16))
    stats = moge.routing_stats(model)
    assert list(stats) == ["0", "1"]
    for s in stats.values():
        assert int(s.expert_load.sum()) == 10 * 4
        assert s.imbalance_score == 0.0 and s.group_load.tolist() == [10, 10, 10, 10]


def test_end_step_of_a_model_moves_the_bias_and_resets_counts():
    torch.manual_seed(0)
    cfg = MoGEConfig(**{**CFG, "bias_update_rate": 0.01})
    model = nn.Sequential(HFStyleBlock(MoGEMLP(cfg)), HFStyleBlock(MoGEMLP(cfg)))
    model(torch.randn(32, 16)).sum().backward()
    assert moge.end_step(model) == 2
    for _, layer in moge.moge_layers(model):
        assert layer.balance_bias_E.abs().sum() > 0
        assert int(layer.load_accum_E.sum()) == 0 and layer.pending_aux_losses == []
        assert layer.calls_since_end_step == 0


def _run(layer, calls, end_step_every=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(calls):
            layer(torch.randn(4, 16))
            if end_step_every and (i + 1) % end_step_every == 0:
                layer.end_step()
    return [w for w in caught if issubclass(w.category, EndStepWarning)]


def test_forgotten_end_step_with_the_bias_warns_once():
    layer = MoGELayer(MoGEConfig(**{**CFG, "bias_update_rate": 0.01}))
    caught = _run(layer, 100)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "64 training calls without end_step()" in message and "bias_update_rate=0.01" in message
    assert "never updates" in message and "moge.end_step(model)" in message
    assert float(layer.balance_bias_E.abs().sum()) == 0.0  # what the warning is about


def test_forgotten_end_step_with_global_batch_counts_warns():
    layer = MoGELayer(MoGEConfig(**{**CFG, "aux_loss_type": "global_batch"}))
    caught = _run(layer, 70)
    assert len(caught) == 1 and "global-batch load counts grow without end" in str(caught[0].message)
    assert int(layer.load_accum_E.sum()) == 70 * 4 * 4


def test_no_warning_when_end_step_is_called_or_not_needed():
    assert _run(MoGELayer(MoGEConfig(**{**CFG, "bias_update_rate": 0.01})), 200, end_step_every=8) == []
    assert _run(MoGELayer(MoGEConfig(**CFG)), 100) == []  # neither bias nor global batch
    layer = MoGELayer(MoGEConfig(**{**CFG, "bias_update_rate": 0.01})).eval()
    assert _run(layer, 100) == []  # eval calls count nothing


def test_uncollected_aux_losses_warn():
    mlp = MoGEMLP(MoGEConfig(**CFG))
    caught = _run(mlp, 70)
    assert len(caught) == 1 and "never collected" in str(caught[0].message)
    assert len(mlp.pending_aux_losses) == 70
    mlp.end_step()
    assert mlp.pending_aux_losses == []


def test_in_a_transformers_llama_model():
    """A real Hugging Face model (built from a config, nothing downloaded): its MLPs
    replaced by MoGEMLP, trained one step with moge.aux_loss, end_step and the stats."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    cfg = MoGEConfig(**{**CFG, "bias_update_rate": 0.01})
    for layer in model.model.layers:
        layer.mlp = MoGEMLP(cfg)
    tokens = torch.randint(0, 64, (2, 12))
    out = model(input_ids=tokens, labels=tokens)
    aux = moge.aux_loss(model)
    assert aux.item() > 0
    (out.loss + aux).backward()
    assert model.model.layers[1].mlp.router.weight.grad.abs().sum() > 0
    assert moge.end_step(model) == 2
    stats = moge.routing_stats(model)
    assert list(stats) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(s.imbalance_score == 0.0 for s in stats.values())
    assert all(float(m.balance_bias_E.abs().sum()) > 0 for _, m in moge.moge_layers(model))
