"""Tests of the counter-based init (moge/model/init.py) and of building on the meta device.

A piece of a parameter gets exactly the whole parameter's values at its positions, with
one block of extra memory; a model built on meta and materialised in one process equals
the one built directly after the same torch.manual_seed. The 2- and 4-rank shards are
checked against the one-process init in tests/distributed/test_distributed_train.py.
"""

from __future__ import annotations

import pytest
import torch
from allocations import LargestAllocation
from hypothesis import given, settings
from hypothesis import strategies as st
from init_cases import INIT_MODEL, INIT_MOE
from torch import nn
from torch.testing import assert_close

import moge.model.init as init_mod
from moge.distributed.mesh import single_process
from moge.distributed.parallelize import materialize
from moge.layer import MoGEConfig
from moge.model import MoGETransformer
from moge.model.config import ModelConfig
from moge.model.init import block_numel, fill_normal_

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
MOE = dict(d_model=32, num_experts=8, num_groups=4, top_k=4, expert_hidden=16, num_shared_experts=1)


@st.composite
def boxes(draw):
    """(whole shape, piece offset, piece shape, block size)."""
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    offset = [draw(st.integers(0, g - 1)) for g in shape]
    piece = [draw(st.integers(1, g - o)) for g, o in zip(shape, offset)]
    return shape, offset, piece, draw(st.integers(1, 40))


@settings(max_examples=150, deadline=None)
@given(boxes())
def test_a_piece_holds_the_whole_init_at_its_positions(box):
    shape, offset, piece, block = box
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(init_mod, "BLOCK_NUMEL", block)  # pieces cross many blocks
        whole = fill_normal_(torch.empty(shape), 7, "w", 0.5)
        got = fill_normal_(torch.empty(piece), 7, "w", 0.5, shape, offset)
        region = whole[tuple(slice(o, o + p) for o, p in zip(offset, piece))]
        assert torch.equal(got, region)
        strided = torch.empty(list(reversed(piece))).permute(*reversed(range(len(piece))))  # not contiguous
        assert torch.equal(fill_normal_(strided, 7, "w", 0.5, shape, offset), region)


def test_values_follow_seed_and_name_and_have_the_std(monkeypatch):
    monkeypatch.setattr(init_mod, "BLOCK_NUMEL", 1000)
    a = fill_normal_(torch.empty(200, 100), 1, "a", 0.02)
    assert torch.equal(a, fill_normal_(torch.empty(200, 100), 1, "a", 0.02))
    assert not torch.equal(a, fill_normal_(torch.empty(200, 100), 2, "a", 0.02))
    assert not torch.equal(a, fill_normal_(torch.empty(200, 100), 1, "b", 0.02))
    assert abs(a.std().item() / 0.02 - 1) < 0.03 and abs(a.mean().item()) < 0.002
    rows = a.view(20, 1000)  # the 20 blocks: independent draws, not one block repeated
    assert torch.unique(rows[:, 0]).numel() == 20
    assert block_numel(10) == 10 and block_numel(10**9) == 1000


def test_filling_a_piece_allocates_at_most_one_block(monkeypatch):
    monkeypatch.setattr(init_mod, "BLOCK_NUMEL", 256)
    piece = torch.empty(8, 64, 16)  # 8 of 64 rows x 64 columns x 16 of a [64, 64, 16] tensor
    with LargestAllocation() as probe:
        fill_normal_(piece, 0, "experts", 0.02, (64, 64, 16), (8, 0, 0))
    assert probe.largest == 256 * 4, probe.op
    with LargestAllocation() as probe:
        fill_normal_(torch.empty(64, 64, 16), 0, "experts", 0.02)
    assert probe.largest == 64 * 64 * 16 * 4, "the probe sees the whole tensor when it is allocated"


CONFIGS = {
    "default": ({}, {}),
    "biases_tied_dense": (dict(qkv_bias=True, o_bias=True, tie_embeddings=True, first_dense_layers=1), {}),
    "qk_norm_gate_bias": (dict(qk_norm=True), dict(shared_expert_gate=True, bias_update_rate=0.01)),
    "random_router": ({}, dict(router="random", rre_vocab_size=64, learned_expert_scale=True)),
}


def build(name: str, meta: bool) -> MoGETransformer:
    model_kw, moe_kw = CONFIGS[name]
    model_cfg, moe_cfg = ModelConfig(**{**MODEL, **model_kw}), MoGEConfig(**{**MOE, **moe_kw})
    torch.manual_seed(3)
    if not meta:
        return MoGETransformer(model_cfg, moe_cfg)
    with torch.device("meta"):
        model = MoGETransformer(model_cfg, moe_cfg)
    assert all(p.is_meta for p in model.parameters())
    return materialize(model, single_process())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_meta_build_materialised_is_the_direct_build(name):
    direct, meta = build(name, meta=False), build(name, meta=True)
    got = dict(meta.named_buffers()) | dict(meta.named_parameters())
    want = dict(direct.named_buffers()) | dict(direct.named_parameters())
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert not got[key].is_meta and torch.equal(got[key], value), key


def test_the_seed_is_the_first_draw_and_a_meta_build_draws_nothing():
    torch.manual_seed(5)
    with torch.device("meta"):
        MoGETransformer(ModelConfig(**MODEL), MoGEConfig(**MOE))
    after_meta = torch.get_rng_state()
    torch.manual_seed(5)
    assert torch.equal(after_meta, torch.get_rng_state())
    first = build("default", meta=False)
    torch.manual_seed(4)
    other = MoGETransformer(ModelConfig(**MODEL), MoGEConfig(**MOE))
    assert not torch.equal(first.embed.weight, other.embed.weight)
    with torch.no_grad():
        first.embed.weight.zero_()
    first.init_weights()  # its own seed again: the initial weights
    assert torch.equal(first.embed.weight, build("default", meta=False).embed.weight)


def test_a_buffer_no_module_can_recreate_is_an_error():
    with torch.device("meta"):
        model = MoGETransformer(ModelConfig(**MODEL), MoGEConfig(**MOE))
        model.extra = nn.Module()
        model.extra.register_buffer("table", torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"materialize: buffers extra\.table have no init_buffers"):
        materialize(model, single_process())


@pytest.mark.parametrize("parents_first", [True, False])
def test_module_by_module_reset_of_a_meta_build_gives_init_weights_distribution(parents_first):
    """reset_parameters() on every module that has one (parents first, as `for m in
    model.modules()` and FSDP's materialisation, or children first, as model.apply): each
    weight has init_weights' std (not Kaiming-uniform, N(0, 1) embeddings, or the layer's
    own init_std), biases 0, norms and expert scales 1, buffers (RoPE tables) computed."""
    model_cfg, moe_cfg = ModelConfig(**INIT_MODEL), MoGEConfig(**INIT_MOE)
    torch.manual_seed(0)
    eager = MoGETransformer(model_cfg, moe_cfg)
    with torch.device("meta"):
        model = MoGETransformer(model_cfg, moe_cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(7)  # to_empty's memory holds any bits
    torch.manual_seed(1)
    modules = list(model.modules())
    for m in modules if parents_first else reversed(modules):
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for name, want in eager.named_parameters():
        got = model.get_parameter(name)
        if torch.all(want == want.reshape(-1)[0]):  # the constants: biases, norms, expert scales
            assert_close(got, want, rtol=0, atol=0, msg=name)
            continue
        # Two sample stds, each within std / sqrt(2 N): 4 of their combined spread at most.
        tol = 4 / want.numel() ** 0.5
        ratio = got.std().item() / want.std().item()
        assert abs(ratio - 1) < tol, (name, ratio)
    for name, buf in eager.named_buffers():
        assert_close(model.get_buffer(name), buf, rtol=0, atol=0, msg=name)


def test_load_state_dict_with_assign_into_a_meta_build_computes_as_the_eager_model():
    """load_state_dict(sd, assign=True) leaves no buffer on meta (the RoPE tables and the
    random router's table, which no state dict carries): forward equals the eager model's."""
    model_cfg = ModelConfig(**MODEL)
    moe_cfg = MoGEConfig(**{**MOE, "router": "random", "rre_vocab_size": 64, "bias_update_rate": 0.1})
    torch.manual_seed(0)
    eager = MoGETransformer(model_cfg, moe_cfg)
    with torch.device("meta"):
        model = MoGETransformer(model_cfg, moe_cfg)
    model.load_state_dict(eager.state_dict(), assign=True)
    for name, buf in eager.named_buffers():
        assert_close(model.get_buffer(name), buf, rtol=0, atol=0, msg=name)
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    got, want = model(tokens[:, :-1], tokens[:, 1:]), eager(tokens[:, :-1], tokens[:, 1:])
    assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert_close(got.loss, want.loss, rtol=0, atol=0)
