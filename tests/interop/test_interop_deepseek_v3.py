"""The DeepSeek-V3 MoE block against transformers' own DeepseekV3MoE on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from moge.interop.deepseek_v3 import block_state_dict, load_block

FIELDS = dict(
    hidden_size=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
    moe_intermediate_size=6, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True,
)  # fmt: skip


def _block(seed=0) -> DeepseekV3MoE:
    torch.manual_seed(seed)
    block = DeepseekV3MoE(DeepseekV3Config(**FIELDS)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
        block.gate.e_score_correction_bias.normal_(0.0, 0.5)  # big enough to change the selection
    return block


def _x(seed=1):
    return torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(seed))


def test_block_equals_transformers_with_the_correction_bias():
    block = _block()
    moe = load_block(block.state_dict(), config=FIELDS).eval()
    assert moe.config.bias_update_rate == 0 and moe.balance_bias_E is not None
    assert torch.equal(moe.balance_bias_E, block.gate.e_score_correction_bias)
    x = _x()
    with torch.no_grad():
        theirs, ours = block(x), moe(x).hidden
    torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=1e-5)
    # The bias matters: routing without it picks other experts for some tokens.
    with torch.no_grad():
        moe.balance_bias_E.zero_()
        assert not torch.allclose(moe(x).hidden, theirs, atol=1e-3)


def test_bias_stays_fixed_through_end_step():
    moe = load_block(_block().state_dict(), config=FIELDS).train()
    before = moe.balance_bias_E.clone()
    moe(_x())
    moe.end_step()
    assert torch.equal(moe.balance_bias_E, before)


def test_from_a_checkpoint_folder_and_back(tmp_path):
    block = _block(2)
    state = {
        f"model.layers.1.mlp.{k}": v
        for k, v in block_state_dict(load_block(block.state_dict(), config=FIELDS)).items()
    }
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(16, 4)  # another layer: not ours
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    fields = {**FIELDS, "model_type": "deepseek_v3", "first_k_dense_replace": 1}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    moe = load_block(tmp_path, layer=1).eval()
    x = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(
            moe(x).hidden, block(x), atol=1e-5 * block(x).abs().max().item(), rtol=1e-5
        )
    back = block_state_dict(moe, "model.layers.1.mlp.")
    for k, v in back.items():
        assert torch.equal(v, state[k]), k


def test_a_config_without_the_routing_fields_means_what_it_means_to_transformers(tmp_path):
    """A config.json that leaves out routed_scaling_factor, n_shared_experts, n_group,
    topk_group, norm_topk_prob and first_k_dense_replace gets transformers' defaults
    (2.5, 1, 8, 4, True, 3), not moge's: the same weights give the same output."""
    sizes = dict(hidden_size=16, n_routed_experts=16, num_experts_per_tok=3, moe_intermediate_size=6)
    torch.manual_seed(4)
    block = DeepseekV3MoE(DeepseekV3Config(**sizes)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
        block.gate.e_score_correction_bias.normal_(0.0, 0.5)
    state = {f"model.layers.3.mlp.{k}": v for k, v in block.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({**sizes, "model_type": "deepseek_v3"}))
    moe = load_block(tmp_path, layer=3).eval()
    c = moe.config
    assert (c.route_scale, c.num_shared_experts, c.num_groups, c.topk_groups) == (2.5, 1, 8, 4)
    x = _x(5)
    with torch.no_grad():
        theirs = block(x)
        torch.testing.assert_close(moe(x).hidden, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"model\.layers\.2 is a dense MLP.*first_k_dense_replace 3"):
        load_block(tmp_path, layer=2)


def test_wrong_shape_names_the_key():
    state = dict(_block().state_dict())
    with pytest.raises(ValueError, match=r"gate\.weight: expected shape \[8, 16\].*found \[8, 12\]"):
        load_block({**state, "gate.weight": torch.zeros(8, 12)}, config=FIELDS)


def test_a_dense_or_missing_layer_is_named_as_such(tmp_path):
    """Layers below first_k_dense_replace are dense MLPs in transformers; past the last there are none."""
    state = {
        f"model.layers.1.mlp.{k}": v
        for k, v in block_state_dict(load_block(_block().state_dict(), config=FIELDS)).items()
    }
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    fields = {**FIELDS, "model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 1}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert load_block(tmp_path, layer=1).config.num_experts == 8
    with pytest.raises(ValueError, match=r"model\.layers\.0 is a dense MLP.*first_k_dense_replace 1"):
        load_block(tmp_path, layer=0)
    with pytest.raises(ValueError, match="layer: 2 is not a layer of the model.*num_hidden_layers 2"):
        load_block(tmp_path, layer=2)


def test_capacity_factor_is_refused_on_export():
    moe = load_block(_block().state_dict(), config=FIELDS, capacity_factor=1.0)
    with pytest.raises(ValueError, match="layout deepseek_v3: cannot express capacity_factor 1.0"):
        block_state_dict(moe)


def test_an_activation_other_than_silu_is_refused():
    """transformers' block applies config.hidden_act in every expert: a gelu block is
    another function of the same weights, so it is refused, not computed with SiLU."""
    block = _block()
    gelu = DeepseekV3MoE(DeepseekV3Config(**FIELDS, hidden_act="gelu")).eval()
    gelu.load_state_dict(block.state_dict())
    x = _x()
    with torch.no_grad():
        assert not torch.allclose(gelu(x), block(x), atol=1e-2)
    with pytest.raises(ValueError, match="config.json: hidden_act 'gelu': moge's FFNs are SwiGLU"):
        load_block(gelu.state_dict(), config={**FIELDS, "hidden_act": "gelu"})


@pytest.mark.parametrize(
    "field", ["hidden_size", "n_routed_experts", "n_group", "topk_group", "num_experts_per_tok",
              "moe_intermediate_size", "n_shared_experts"],
)  # fmt: skip
@pytest.mark.parametrize("bad", [6.5, "6", True])
def test_a_size_that_is_not_an_integer_is_named(field, bad):
    """int() read 6.5 as 6 and "6" as a TypeError; an integral float is its integer."""
    from moge.interop.deepseek_v3 import block_config

    with pytest.raises(ValueError) as err:
        block_config({**FIELDS, field: bad}, "/m/config.json")
    assert (
        str(err.value) == f"/m/config.json: {field}: expected an integer, got {bad!r} ({type(bad).__name__})"
    )
    assert block_config({**FIELDS, field: float(FIELDS[field])}) == block_config(FIELDS)


@pytest.mark.parametrize("field", ["num_hidden_layers", "first_k_dense_replace"])
def test_a_layer_count_that_is_not_an_integer_is_named(tmp_path, field):
    fields = {**FIELDS, "model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 1}
    (tmp_path / "config.json").write_text(json.dumps({**fields, field: 1.5}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"config\.json: {field}: expected an integer, got 1\.5 \(float\)"):
        load_block(tmp_path, layer=1)


@pytest.mark.parametrize("bad", ["false", 0, 1])
def test_a_norm_topk_prob_that_is_not_true_or_false_is_named(bad):
    """bool() read "false" as true: the block would renormalise where transformers' does not."""
    from moge.interop.deepseek_v3 import block_config

    with pytest.raises(ValueError) as err:
        block_config({**FIELDS, "norm_topk_prob": bad}, "/m/config.json")
    assert str(err.value) == (
        f"/m/config.json: norm_topk_prob: expected true or false, got {bad!r} ({type(bad).__name__})"
    )


def test_a_null_norm_topk_prob_does_not_renormalise_as_in_transformers():
    """DeepseekV3Config takes norm_topk_prob None (bool | None) and its block then skips the
    renormalisation (`if self.norm_topk_prob`), so null is false here, not the default true."""
    from moge.interop.deepseek_v3 import block_config

    assert block_config({**FIELDS, "norm_topk_prob": None}).normalize_weights is False
    assert block_config({k: v for k, v in FIELDS.items() if k != "norm_topk_prob"}).normalize_weights is True


@pytest.mark.parametrize("bad", ["2.5", True, None, float("nan"), float("inf"), 0, -1.0])
def test_a_routed_scaling_factor_that_is_not_a_positive_number_is_named(bad):
    """float() took "2.5" and true (1.0), and null was a bare TypeError."""
    from moge.interop.deepseek_v3 import block_config

    with pytest.raises(ValueError) as err:
        block_config({**FIELDS, "routed_scaling_factor": bad}, "/m/config.json")
    if isinstance(bad, bool) or not isinstance(bad, (int, float)):
        want = f"expected a number, got {bad!r} ({type(bad).__name__})"
    else:
        want = (
            f"must be finite, got {bad}"
            if bad != bad or abs(bad) == float("inf")
            else f"must be > 0.0, got {bad}"
        )
    assert str(err.value) == f"/m/config.json: routed_scaling_factor: {want}"
    assert block_config({**FIELDS, "routed_scaling_factor": 2}).route_scale == 2.0  # an integer is a number
