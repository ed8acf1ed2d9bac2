"""Tests of moge/model/transformer.py: the decoder around the MoGE layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import repeat
from reference import reference_experts
from safetensors.torch import save_file
from torch.testing import assert_close

from moge.experts import SwiGLU
from moge.layer import MoGEConfig, MoGELayer
from moge.model import (
    KVCache,
    MoGETransformer,
    RMSNorm,
    RotaryEmbedding,
    count_parameters,
    format_params,
    sample_next,
)
from moge.model.config import ModelConfig

V, D = 64, 32


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def moe_cfg(**kw) -> MoGEConfig:
    base = dict(
        d_model=D, num_experts=8, num_groups=4, top_k=4, expert_hidden=16,
        num_shared_experts=1, learned_expert_scale=True, aux_loss_coef=0.01,
    )  # fmt: skip
    return MoGEConfig(**{**base, **kw})


def build(seed: int = 0, moe: MoGEConfig | None = None, **model_kw) -> MoGETransformer:
    torch.manual_seed(seed)
    return MoGETransformer(model_cfg(**model_kw), moe or moe_cfg()).eval()


def tokens(B: int, L: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


# --- outputs and loss -------------------------------------------------------------


def test_output_shapes_and_loss():
    model = build(first_dense_layers=1)
    x_BL = tokens(2, 12)
    out = model(x_BL, x_BL.roll(-1, dims=1))
    assert out.logits.shape == (2, 12, V)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    assert_close(out.loss, out.lm_loss + out.aux_loss)
    no_targets = model(x_BL)
    assert no_targets.loss is None and no_targets.lm_loss is None
    assert_close(no_targets.logits, out.logits)


@pytest.mark.parametrize("tie", [False, True])
def test_loss_at_init_is_near_log_vocab(tie):
    model = build(tie_embeddings=tie)
    x_BL = tokens(4, 16)
    lm_loss = model(x_BL, tokens(4, 16, seed=2)).lm_loss
    assert abs(lm_loss.item() - math.log(V)) < 0.05


def test_ignore_index_targets_do_not_count():
    model = build()
    x_BL, t_BL = tokens(2, 10), tokens(2, 10, seed=2)
    masked = t_BL.clone()
    masked[:, 5:] = -100
    expected = model(x_BL[:, :5], t_BL[:, :5]).lm_loss  # causal: the first 5 logits are the same
    assert_close(model(x_BL, masked).lm_loss, expected)


def test_targets_that_are_all_ignored_give_a_zero_lm_loss():
    # A batch of padding only: nothing counts, so the LM loss is 0 and adds no gradient
    # (the mean was 0/0 = NaN, which made the whole loss NaN).
    model = build().train()
    x_BL = tokens(2, 6)
    out = model(x_BL, torch.full_like(x_BL, -100))
    assert out.lm_loss.item() == 0.0 and torch.isfinite(out.loss)
    out.lm_loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # the mean of the counted targets otherwise, as cross_entropy's own
    t_BL = tokens(2, 6, seed=2)
    t_BL[0, :4] = -100
    want = F.cross_entropy(model(x_BL).logits.flatten(0, 1), t_BL.flatten(), ignore_index=-100)
    assert_close(model(x_BL, t_BL).lm_loss, want, rtol=0, atol=0)


def test_rmsnorm_keeps_dtype_and_normalises():
    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(3, 5, 16).to(torch.bfloat16) * 7
    y = norm(x)
    assert y.dtype == torch.bfloat16
    rms = y.float().pow(2).mean(-1).sqrt()
    assert_close(rms, torch.ones_like(rms), atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_without_a_graph_equals_the_autograd_path(dtype):
    # Without autograd the norm takes torch's F.rms_norm: the same float32 ops, bit for bit.
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    with torch.no_grad():
        fast = norm(x)
    slow = norm(x)
    assert slow.requires_grad and fast.dtype == dtype
    x32 = x.float()
    plain = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).to(dtype)
    assert torch.equal(fast, slow.detach()) and torch.equal(slow.detach(), plain.detach())


# --- attention ----------------------------------------------------------------------


def test_causality():
    model = build()
    x_BL = tokens(2, 12)
    changed = x_BL.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    before, after = model(x_BL).logits, model(changed).logits
    assert_close(after[:, :7], before[:, :7])
    assert not torch.allclose(after[:, 7:], before[:, 7:])


def test_rope_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        return (rope(q, m) * rope(k, n)).sum()

    assert_close(score(5, 2), score(20, 17))
    assert_close(score(5, 2), score(60, 57))
    assert not torch.allclose(score(5, 2), score(5, 3))
    assert_close(rope(q, 0), q)  # position 0 is the identity
    assert_close(rope(q, 33).norm(), q.norm())  # a rotation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_rotate_half_formula_bit_for_bit(dtype):
    C, start = 8, 3
    rope = RotaryEmbedding(head_dim=C, max_seq_len=32, theta=500.0)
    x = torch.randn(2, 3, 6, C, generator=torch.Generator().manual_seed(1)).to(dtype)
    inv_freq = 1.0 / 500.0 ** (torch.arange(0, C, 2, dtype=torch.float32) / C)
    angle = torch.outer(torch.arange(start, start + 6, dtype=torch.float32), inv_freq).repeat(1, 2)
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    want = (x32 * angle.cos() + torch.cat((-x2, x1), dim=-1) * angle.sin()).to(dtype)
    assert torch.equal(rope(x, start), want)


def test_rope_tables_stay_float32_and_exact_through_a_bf16_cast():
    from moge.model.transformer import RotaryEmbedding

    fresh = [m for m in build().modules() if isinstance(m, RotaryEmbedding)]
    cast = [m for m in build().to(torch.bfloat16).modules() if isinstance(m, RotaryEmbedding)]
    assert cast and len(cast) == len(fresh)
    for a, b in zip(cast, fresh):
        assert a.cos_PC.dtype == a.sin_PC.dtype == torch.float32
        assert torch.equal(a.cos_PC, b.cos_PC) and torch.equal(a.sin_PC, b.sin_PC)


def test_rope_start_offset_equals_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8, max_seq_len=32, theta=500.0)
    x = torch.randn(2, 3, 6, 8)
    whole = rope(x, 4)
    for i in range(6):
        assert_close(whole[:, :, i : i + 1], rope(x[:, :, i : i + 1], 4 + i))


def test_gqa_equals_attention_with_repeated_kv_heads():
    gqa = build(n_heads=4, n_kv_heads=2, first_dense_layers=2)
    mha = build(n_heads=4, n_kv_heads=4, first_dense_layers=2)
    C = gqa.cfg.resolved_head_dim
    assert gqa.blocks[0].attn.k_proj.out_features == 2 * C
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # Query head h reads KV head h // 2: copy each KV head to its query heads.
            state[name] = repeat(w, "(n c) d -> (n r c) d", c=C, r=2)
    mha.load_state_dict(state)
    x_BL = tokens(2, 10)
    assert_close(mha(x_BL).logits, gqa(x_BL).logits)


def test_qkv_bias_toggles_parameters():
    with_bias = dict(build(qkv_bias=True).named_parameters())
    without = dict(build(qkv_bias=False).named_parameters())
    extra = set(with_bias) - set(without)
    assert extra == {f"blocks.{i}.attn.{p}_proj.bias" for i in range(2) for p in "qkv"}
    assert set(without) <= set(with_bias)
    for name in extra:
        assert_close(with_bias[name], torch.zeros_like(with_bias[name]))


def test_tied_and_untied_head():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == V * D
    assert "lm_head.weight" in dict(untied.named_parameters())
    assert "lm_head.weight" not in dict(tied.named_parameters())
    x_BL = torch.randint(0, V // 2, (2, 8))  # ids >= V/2 never appear in the input
    for model, head_reaches_unused_rows in ((tied, True), (untied, False)):
        model.zero_grad()
        model(x_BL, x_BL).loss.backward()
        unused_rows = model.embed.weight.grad[V // 2 :]
        assert bool(unused_rows.abs().sum() > 0) == head_reaches_unused_rows


def test_tied_model_saves_with_safetensors(tmp_path):
    model = build(tie_embeddings=True)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))  # no shared tensors


# --- MoE placement and routing -------------------------------------------------------


@pytest.mark.parametrize(
    "n_layers, first_dense, every, moe_idx",
    [(4, 0, 1, [0, 1, 2, 3]), (5, 1, 2, [1, 3]), (6, 2, 3, [2, 5]), (3, 3, 1, [])],
)
def test_dense_and_moe_placement(n_layers, first_dense, every, moe_idx):
    model = build(n_layers=n_layers, first_dense_layers=first_dense, moe_every=every)
    kinds = [isinstance(b.ffn, MoGELayer) for b in model.blocks]
    assert [i for i, moe in enumerate(kinds) if moe] == moe_idx
    assert all(isinstance(b.ffn, SwiGLU) for b, moe in zip(model.blocks, kinds) if not moe)
    assert list(model.moe_layers()) == [model.blocks[i].ffn for i in moe_idx]
    for b, moe in zip(model.blocks, kinds):
        if not moe:  # dense width: 4 * d_model by default
            assert b.ffn.w_gate_up.out_features == 2 * 4 * D
    assert len(model(tokens(2, 6)).routing) == len(moe_idx)


def test_aux_loss_is_summed_over_moe_layers():
    model = build(n_layers=4, first_dense_layers=1, moe=moe_cfg(z_loss_coef=0.01))
    out = model(tokens(2, 8), tokens(2, 8, seed=2))
    assert len(out.routing) == 3
    assert_close(out.aux_loss, torch.stack([r.aux_loss for r in out.routing]).sum())
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    assert_close(out.loss, out.lm_loss + out.aux_loss)
    for r in out.routing:
        assert r.expert_ids.shape == (16, 4) and r.hidden.shape == (2, 8, D)


def test_dense_only_model_has_zero_aux_loss():
    out = build(first_dense_layers=2)(tokens(2, 8), tokens(2, 8, seed=2))
    assert out.routing == []
    assert_close(out.aux_loss, torch.tensor(0.0))
    assert_close(out.loss, out.lm_loss)


def test_token_ids_reach_random_router():
    moe = moe_cfg(router="random", rre_vocab_size=V)
    model = build(n_layers=2, moe=moe)
    x_BL = tokens(3, 10)
    out = model(x_BL)
    assert len(out.routing) == 2
    for layer, routed in zip(model.moe_layers(), out.routing):
        # The random router ignores hidden states: any input with the same ids routes the same.
        direct = layer(torch.randn(3, 10, D), token_ids=x_BL)
        assert torch.equal(routed.expert_ids, direct.expert_ids)


def test_random_router_vocab_must_match():
    with pytest.raises(ValueError, match="moe.rre_vocab_size"):
        build(moe=moe_cfg(router="random", rre_vocab_size=V + 1))


# --- KV cache and generation ---------------------------------------------------------


def test_kv_cache_logits_equal_full_forward():
    model = build(n_layers=3, first_dense_layers=1, qkv_bias=True)
    seq_BL = tokens(2, 14)
    full_BLV = model(seq_BL).logits
    cache = model.new_cache()
    assert isinstance(cache, KVCache)
    assert_close(model(seq_BL[:, :5], cache=cache).logits, full_BLV[:, :5])
    for t in range(5, 9):  # one token at a time
        assert_close(model(seq_BL[:, t : t + 1], cache=cache).logits, full_BLV[:, t : t + 1])
    # several new tokens after a prefix: needs the offset causal mask
    assert_close(model(seq_BL[:, 9:14], cache=cache).logits, full_BLV[:, 9:14])
    assert cache.pos == 14


def _generate_without_cache(model, prompt_BL, n, temperature, top_k, generator):
    seq_BL = prompt_BL
    for _ in range(n):
        logits_BV = model(seq_BL).logits[:, -1]
        seq_BL = torch.cat([seq_BL, sample_next(logits_BV, temperature, top_k, generator)], dim=1)
    return seq_BL


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_generate_equals_generation_without_cache(temperature, top_k):
    model = build(n_layers=2, first_dense_layers=1)
    prompt_BL = tokens(2, 4)
    got = model.generate(prompt_BL, 10, temperature, top_k, torch.Generator().manual_seed(7))
    want = _generate_without_cache(model, prompt_BL, 10, temperature, top_k, torch.Generator().manual_seed(7))
    assert got.shape == (2, 14)
    assert torch.equal(got[:, :4], prompt_BL)
    assert torch.equal(got, want)


def test_sampling_top_k_one_is_greedy_and_sampling_differs():
    model = build()
    prompt_BL = tokens(2, 4)
    greedy = model.generate(prompt_BL, 12, temperature=0.0)
    top1 = model.generate(prompt_BL, 12, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3))
    sampled = model.generate(prompt_BL, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy)
    assert not torch.equal(sampled, greedy)


@pytest.mark.parametrize("temperature", [1e6, float("inf")])
def test_top_k_holds_at_any_temperature(temperature):
    # top_k was applied after dividing by the temperature: at inf every logit became 0, so
    # all tied with the k-th and the whole vocabulary was sampled.
    logits_BV = torch.randn(64, V, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    ids_B1 = sample_next(logits_BV, temperature, 3, gen)
    top3_B3 = logits_BV.topk(3, dim=-1).indices
    assert (ids_B1 == top3_B3).any(dim=-1).all()
    assert len(ids_B1.unique()) > 3, "still sampled: not greedy"
    assert torch.equal(sample_next(logits_BV, temperature, 1, gen), logits_BV.argmax(-1, keepdim=True))


def test_generate_keeps_training_mode_and_load_statistics():
    model = build(moe=moe_cfg(bias_update_rate=0.1)).train()
    model.generate(tokens(2, 8), 4, temperature=0.0)
    assert model.training
    # Generation runs in eval mode, so it feeds nothing to the balance-bias update.
    for layer in model.moe_layers():
        layer.end_step()
        assert_close(layer.balance_bias_E, torch.zeros(8))


def test_generate_stops_at_max_seq_len():
    model = build(max_seq_len=16)
    assert model.generate(tokens(1, 10), 6, temperature=0.0).shape == (1, 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(tokens(1, 10), 7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": True}, "^top_k: expected an integer"),  # was a TypeError from torch.topk
        ({"top_k": 0}, "^top_k: expected an integer"),
        ({"temperature": True}, "^temperature: expected a number"),  # was sampling at temperature 1
        ({"temperature": "0.8"}, "^temperature: expected a number"),  # was a TypeError from >=
        ({"temperature": float("nan")}, "^temperature: must be >= 0"),
        ({"temperature": -0.5}, "^temperature: must be >= 0"),
        ({"top_p": 0.0}, "^top_p: must be in \\(0, 1\\]"),  # an empty nucleus
        ({"top_p": -0.1}, "^top_p: must be in \\(0, 1\\]"),
        ({"top_p": 1.5}, "^top_p: must be in \\(0, 1\\]"),
        ({"top_p": float("nan")}, "^top_p: must be in \\(0, 1\\]"),
        ({"top_p": True}, "^top_p: expected a number"),
        ({"top_p": None}, "^top_p: expected a number"),
        ({"top_p": "0.9"}, "^top_p: expected a number"),
        ({"top_p": 0.0, "temperature": 0.0}, "^top_p: must be in"),  # checked even when greedy
    ],
)
def test_generate_refuses_bad_sampling_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build().generate(tokens(1, 4), 2, **kwargs)


@pytest.mark.parametrize(
    "settings, match",
    [((1.0, 0, 1.0), "^top_k: expected an integer"), ((-0.5, None, 1.0), "^temperature: must be >= 0"),
     ((1.0, None, 0.0), "^top_p: must be in")],
)  # fmt: skip
@pytest.mark.parametrize("name", ["sample_next", "sampling_logits"])
def test_the_public_samplers_refuse_bad_settings_as_generate_does(name, settings, match):
    from moge.model import transformer

    temperature, top_k, top_p = settings
    with pytest.raises(ValueError, match=match):
        getattr(transformer, name)(torch.zeros(1, 5), temperature, top_k, top_p=top_p)


def _left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts -> (tokens [B, L], mask [B, L]) padded on the left with pad_id."""
    L = max(len(p) for p in prompts)
    tokens_BL = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask_BL = torch.zeros(len(prompts), L, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens_BL[b, L - len(p) :], mask_BL[b, L - len(p) :] = p, True
    return tokens_BL, mask_BL


@pytest.mark.parametrize("qk_norm", [False, True])
def test_generate_left_padded_prompts_give_each_prompt_alone(qk_norm):
    # Without a mask the padding was attended to and shifted every position, so a short
    # prompt in a batch gave other tokens than alone.
    model = build(n_layers=3, first_dense_layers=1, qkv_bias=True, qk_norm=qk_norm)
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 7, 5, 7)]
    tokens_BL, mask_BL = _left_pad(prompts, pad_id=V - 1)
    got = model.generate(tokens_BL, 9, temperature=0.0, mask=mask_BL)
    assert got.shape == (4, 7 + 9)
    assert torch.equal(got[:, :7], tokens_BL)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], 9, temperature=0.0)
        assert torch.equal(got[b, 7 - len(p) :], alone[0]), f"prompt {b} of length {len(p)}"


def test_a_left_padded_cache_gives_the_logits_of_each_prompt_alone():
    model = build(n_layers=2, qkv_bias=True)
    prompts = [tokens(1, n, seed=n)[0] for n in (2, 6)]
    tokens_BL, mask_BL = _left_pad(prompts, pad_id=0)
    pad_B = (~mask_BL).sum(1)
    cache = model.new_cache(pad_B=pad_B)
    prefill_BLV = model(tokens_BL, cache=cache, mask=mask_BL).logits
    step_BLV = model(tokens(2, 3, seed=9), cache=cache).logits  # three new tokens at once
    for b, p in enumerate(prompts):
        alone_BLV = model(torch.cat([p, tokens(2, 3, seed=9)[b]])[None]).logits
        assert_close(prefill_BLV[b, 6 - len(p) :], alone_BLV[0, : len(p)], atol=1e-5, rtol=1e-5)
        assert_close(step_BLV[b], alone_BLV[0, len(p) :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.tensor([[True, True, False, True]]), "padding on the left"),  # a hole
        (torch.tensor([[True, True, True, False]]), "padding on the left"),  # right padding
        (torch.tensor([[False, False, False, False]]), "no real token"),
        (torch.ones(1, 3, dtype=torch.bool), "shape"),
        (torch.ones(1, 4, dtype=torch.long), "bool"),
    ],
)
def test_generate_refuses_masks_that_are_not_left_padding(mask, match):
    with pytest.raises(ValueError, match=f"^mask: .*{match}"):
        build().generate(tokens(1, 4), 2, temperature=0.0, mask=mask)


def test_generate_stops_a_sequence_once_it_emits_the_stop_token():
    model = build()
    prompt_BL = tokens(2, 4)
    free = model.generate(prompt_BL, 12, temperature=0.0)
    stop = int(free[0, 4 + 2])  # row 0's third new token
    got = model.generate(prompt_BL, 12, temperature=0.0, stop_token=stop)
    for b in range(2):
        new = free[b, 4:].tolist()
        n = new.index(stop) + 1 if stop in new else len(new)
        assert got[b, 4 : 4 + n].tolist() == new[:n]  # grows until it emits the stop token
        assert (got[b, 4 + n :] == stop).all()  # then only repeats it
    # the output ends as soon as every row has stopped
    ends = [(free[b, 4:] == stop).nonzero()[:1] for b in range(2)]
    assert got.shape[1] == 4 + (12 if any(len(e) == 0 for e in ends) else max(int(e) + 1 for e in ends))
    alone = model.generate(prompt_BL[:1], 12, temperature=0.0, stop_token=stop)
    first = free[0, 4:].tolist().index(stop) + 1  # at most 3: the third new token is one
    assert torch.equal(alone, free[:1, : 4 + first])


@pytest.mark.parametrize("stop", [-1, V, True, 1.0])
def test_generate_refuses_a_stop_token_outside_the_vocabulary(stop):
    with pytest.raises(ValueError, match="^stop_token: "):
        build().generate(tokens(1, 4), 2, stop_token=stop)


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8"])
def test_generate_takes_numpy_integers_as_ints(dtype):
    """max_new_tokens, top_k and stop_token as NumPy integers (say from np.argmax or an
    array of settings) give what the same Python ints give."""
    np = pytest.importorskip("numpy")
    as_np = getattr(np, dtype)
    model, prompt_BL = build(), tokens(2, 4)
    stop = int(model.generate(prompt_BL, 8, temperature=0.0)[0, 6])
    want = model.generate(prompt_BL, 8, 1.0, 3, torch.Generator().manual_seed(5), stop_token=stop)
    got = model.generate(
        prompt_BL, as_np(8), 1.0, as_np(3), torch.Generator().manual_seed(5), stop_token=as_np(stop)
    )
    assert torch.equal(got, want)
    assert torch.equal(model.generate(prompt_BL, as_np(0)), prompt_BL)


INT_ARGS = {  # generate's integer arguments -> the start of their error
    "max_new_tokens": "^max_new_tokens: expected an integer >= 0",
    "top_k": r"^top_k: expected an integer >= 1 or None",
    "stop_token": r"^stop_token: expected a token id in \[0, ",
}


# name -> value made from numpy: bools are Integral (True would pass as 1), floats are not
BAD_INTS = {
    "True": lambda np: True,
    "np.True_": lambda np: np.True_,
    "2.0": lambda np: 2.0,
    "np.float64(2.0)": lambda np: np.float64(2.0),
    "np.int64(-1)": lambda np: np.int64(-1),
    "'2'": lambda np: "2",
}


@pytest.mark.parametrize("arg", list(INT_ARGS))
@pytest.mark.parametrize("bad", list(BAD_INTS))
def test_generate_refuses_bools_floats_and_out_of_range_numpy_ints(arg, bad):
    np = pytest.importorskip("numpy")
    kwargs = {"max_new_tokens": 2, arg: BAD_INTS[bad](np)}
    with pytest.raises(ValueError, match=INT_ARGS[arg]):
        build().generate(tokens(1, 4), **kwargs)


# --- nucleus (top_p) sampling and edge cases -------------------------------------------


def _nucleus_by_hand(logits_V: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> set[int]:
    """The top_p nucleus of softmax(logits / T) after top_k, in float64, one token at a time."""
    probs = F.softmax(logits_V.double() / temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k]
    total = sum(probs[i] for i in order)  # top_k renormalises what it keeps
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i] / total
        if mass >= top_p:
            assert mass - probs[i] / total < top_p - 1e-4 and mass > top_p + 1e-4, "cut too close"
            break
    return set(kept)


# Low temperatures: the untrained model's logits spread by ~0.1, so at T=1 most of the
# vocabulary is in any nucleus.
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.05, None, 0.8), (0.1, None, 0.5), (0.2, 12, 0.8)])
def test_top_p_samples_exactly_the_nucleus(temperature, top_k, top_p):
    model = build()
    prompt_1L = tokens(1, 5, seed=3)
    want = _nucleus_by_hand(model(prompt_1L).logits[0, -1], temperature, top_k, top_p)
    assert 2 <= len(want) <= 20, "a nucleus worth testing: more than one token, each drawn often"
    gen = torch.Generator().manual_seed(11)
    out = model.generate(prompt_1L.expand(4000, 5), 1, temperature, top_k, gen, top_p=top_p)
    assert set(out[:, -1].tolist()) == want


def _transformers_logits(logits_BV, temperature, top_k, top_p):
    """transformers' sampling warpers in the order its generate applies them."""
    warpers = pytest.importorskip("transformers.generation.logits_process")
    chain = warpers.LogitsProcessorList()
    if temperature != 1.0:
        chain.append(warpers.TemperatureLogitsWarper(temperature))
    if top_k is not None:
        chain.append(warpers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(warpers.TopPLogitsWarper(top_p))
    return chain(None, logits_BV.clone())


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, 0.9), (0.6, None, 0.5), (1.5, 10, 0.8), (0.8, 3, 0.95), (1.0, 100, 0.7), (2.0, None, 0.01)],
)
def test_filtered_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    from moge.model.transformer import sampling_logits

    model = build()
    logits_BV = model(tokens(8, 6, seed=4)).logits[:, -1]  # the tiny model's, and wider ones
    logits_BV = torch.cat([logits_BV, 3 * torch.randn(64, V, generator=torch.Generator().manual_seed(2))])
    want_BV = _transformers_logits(logits_BV, temperature, top_k, top_p)
    got_BV = sampling_logits(logits_BV, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got_BV), torch.isinf(want_BV)), "the same tokens filtered"
    assert 0 < torch.isinf(got_BV).sum() < got_BV.numel()
    assert_close(F.softmax(got_BV, -1), F.softmax(want_BV, -1), atol=1e-6, rtol=1e-5)


def test_top_p_keeps_every_token_tied_at_the_cut():
    from moge.model.transformer import sampling_logits

    # Probabilities 0.229 x 4 and 0.084: the nucleus of 0.5 needs three of the four equal
    # tokens; transformers keeps the three its sort puts last, moge all four.
    got = sampling_logits(torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]]), 1.0, None, 0.5)
    assert torch.isinf(got).tolist() == [[False, False, False, False, True]]
    one = sampling_logits(torch.tensor([[2.0, 1.0, 1.0]]), 1.0, None, 0.1)  # the likeliest stays
    assert torch.isinf(one).tolist() == [[False, True, True]]


def _sample_as_before(logits_BV, temperature, top_k, generator):
    """sample_next before top_p: top_k on the logits, shift, divide, draw."""
    logits_BV = logits_BV.float()
    if top_k is not None:
        logits_BV = logits_BV.masked_fill(logits_BV < logits_BV.topk(top_k, -1).values[:, -1:], float("-inf"))
    probs_BV = F.softmax((logits_BV - logits_BV.max(-1, keepdim=True).values) / temperature, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.8, 5)])
def test_top_p_one_leaves_sampling_unchanged(temperature, top_k):
    model = build()
    prompt_BL = tokens(3, 4)
    off = model.generate(prompt_BL, 10, temperature, top_k, torch.Generator().manual_seed(5))
    one = model.generate(prompt_BL, 10, temperature, top_k, torch.Generator().manual_seed(5), top_p=1.0)
    assert torch.equal(one, off)
    gen, seq_BL = torch.Generator().manual_seed(5), prompt_BL
    for _ in range(10):
        logits_BV = model(seq_BL).logits[:, -1]
        seq_BL = torch.cat([seq_BL, _sample_as_before(logits_BV, temperature, top_k, gen)], dim=1)
    assert torch.equal(one, seq_BL)
    # A nucleus smaller than the likeliest token's probability is greedy.
    tiny = model.generate(prompt_BL, 10, temperature, top_k, torch.Generator().manual_seed(5), top_p=1e-6)
    assert torch.equal(tiny, model.generate(prompt_BL, 10, temperature=0.0))


def test_generate_zero_new_tokens_returns_the_prompt_without_running_the_model():
    model = build(max_seq_len=16)
    calls = []
    model.embed.register_forward_hook(lambda *_: calls.append(1))
    prompt_BL = tokens(2, 16)  # at max_seq_len: fits with no new token
    out = model.generate(prompt_BL, 0, stop_token=3)
    assert torch.equal(out, prompt_BL) and out.data_ptr() != prompt_BL.data_ptr()
    assert calls == []


def test_generate_names_a_prompt_over_max_seq_len_and_an_empty_one():
    model = build(max_seq_len=16)
    # was "max_new_tokens: prompt 17 + 0 new tokens exceeds", naming an argument that could not help
    with pytest.raises(ValueError, match="^tokens: prompt length 17 exceeds model.max_seq_len=16"):
        model.generate(tokens(1, 17), 0)
    with pytest.raises(ValueError, match="^max_new_tokens: .*at most 6 new tokens fit"):
        model.generate(tokens(1, 10), 7)
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="^tokens: empty tensor"):
            model.generate(empty, 2)


def test_generate_top_k_over_the_vocabulary_keeps_every_token():
    model = build()
    prompt_BL = tokens(2, 4)
    free = model.generate(prompt_BL, 8, 1.0, None, torch.Generator().manual_seed(9))
    for k in (V, V + 1, 10**6):
        assert torch.equal(model.generate(prompt_BL, 8, 1.0, k, torch.Generator().manual_seed(9)), free)


def test_generate_rows_that_stopped_at_different_steps_stay_stopped():
    model = build()
    prompt_BL = tokens(4, 4, seed=5)
    free = model.generate(prompt_BL, 20, temperature=0.0)
    stop = 8  # this model's rows first emit it at new tokens 11, 3, 15, 2
    firsts = [free[b, 4:].tolist().index(stop) for b in range(4)]
    assert len(set(firsts)) == 4, firsts
    got = model.generate(prompt_BL, 20, temperature=0.0, stop_token=stop)
    assert got.shape == (4, 4 + max(firsts) + 1)  # ends when the last row stops
    for b, first in enumerate(firsts):
        assert torch.equal(got[b, : 4 + first + 1], free[b, : 4 + first + 1])
        assert (got[b, 4 + first :] == stop).all(), f"row {b} changed after it stopped"
    # Sampled: a row that stopped repeats the stop token whatever the others draw.
    sampled = model.generate(prompt_BL, 28, 2.0, 3, torch.Generator().manual_seed(1), stop_token=stop)
    for b in range(4):
        new = sampled[b, 4:].tolist()
        if stop in new:
            assert set(new[new.index(stop) :]) == {stop}


# --- parameter counts ------------------------------------------------------------------


def test_pangu_pro_moe_72b_counts():
    model = ModelConfig(
        vocab_size=153376, d_model=5120, n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128,
        qkv_bias=True, o_bias=True, rope_theta=1.6e7, norm_eps=1e-5, max_seq_len=4096,
        tie_embeddings=False,
    )  # fmt: skip
    moe = MoGEConfig(
        d_model=5120, num_experts=64, num_groups=8, top_k=8, expert_hidden=1344,
        num_shared_experts=4, learned_expert_scale=True,
    )  # fmt: skip
    assert moe.shared_width == 5376
    count = count_parameters(model, moe)
    assert round(count.total / 1e9, 2) == 71.99
    assert round(count.activated / 1e9, 2) == 16.50
    assert count.total == 71_988_535_296 + 48 * 5120  # follows exactly from the sizes (+ o_proj bias)
    per_expert = 3 * 5120 * 1344 + 1  # SwiGLU weights + its learned scale
    assert count.total - count.activated == 48 * (64 - 8) * per_expert
    assert (format_params(count.total), format_params(count.activated)) == ("71.99B", "16.50B")


def test_pangu_preset_counts():
    from pathlib import Path

    from moge.training.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "pangu-pro-moe-72b.yaml")
    count = count_parameters(cfg.model, cfg.moe)
    assert (format_params(count.total), format_params(count.activated)) == ("71.99B", "16.50B")


def test_count_parameters_matches_a_real_model():
    mc, moe = model_cfg(n_layers=3, first_dense_layers=1, qkv_bias=True), moe_cfg()
    count = count_parameters(mc, moe)
    torch.manual_seed(0)
    real = MoGETransformer(mc, moe)
    assert count.total == sum(p.numel() for p in real.parameters())
    assert count.total - count.activated == 2 * (8 - 4) * (3 * D * 16 + 1)


@pytest.mark.parametrize(
    "n, text",
    [(71_988_535_296, "71.99B"), (12_345_678, "12.3M"), (4_500, "4.5K"), (950, "950"), (999_999, "1.0M")],
)
def test_format_params(n, text):
    assert format_params(n) == text


# --- init and bad input ---------------------------------------------------------------


def test_init_follows_the_rules():
    mc = model_cfg(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, qkv_bias=True, init_std=0.05)
    moe = moe_cfg(d_model=64, expert_hidden=64, bias_update_rate=0.01)
    torch.manual_seed(0)
    model = MoGETransformer(mc, moe)
    out_std = 0.05 / math.sqrt(8)
    params = dict(model.named_parameters())
    for name, std in [
        ("embed.weight", 0.05), ("lm_head.weight", 0.05), ("blocks.0.attn.q_proj.weight", 0.05),
        ("blocks.0.attn.o_proj.weight", out_std), ("blocks.1.ffn.router.weight", 0.05),
        ("blocks.1.ffn.experts.w_gate_up_EDH", 0.05), ("blocks.1.ffn.experts.w_down_EFD", out_std),
        ("blocks.1.ffn.shared.w_down.weight", out_std), ("blocks.1.ffn.shared.w_gate_up.weight", 0.05),
    ]:  # fmt: skip
        assert abs(params[name].std().item() / std - 1) < 0.1, name
        assert abs(params[name].mean().item()) < std / 10, name
    for name, p in params.items():
        if name.endswith(("norm.weight", "expert_scale_E")):
            assert_close(p, torch.ones_like(p))
        if name.endswith(".bias"):
            assert_close(p, torch.zeros_like(p))
    dense = build(first_dense_layers=2, n_layers=2)
    assert abs(dense.blocks[0].ffn.w_down.weight.std().item() / (0.02 / 2) - 1) < 0.1


def test_init_weights_leaves_buffers_alone():
    model = build(moe=moe_cfg(bias_update_rate=0.01))
    layer = next(model.moe_layers())
    layer.balance_bias_E.fill_(0.5)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.init_weights()
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.randint(0, V, (8,)), "2-D"),
        (lambda: torch.rand(2, 8), "integer"),
        (lambda: torch.full((2, 8), V), "outside the vocabulary"),
        (lambda: torch.full((2, 8), -1), "outside the vocabulary"),
        (lambda: torch.zeros(2, 33, dtype=torch.long), "exceeds"),
        (lambda: torch.zeros(2, 0, dtype=torch.long), "empty"),
    ],
)
def test_bad_tokens_raise(make, match):
    with pytest.raises(ValueError, match=match):
        build()(make())


def test_bad_targets_and_configs_raise():
    model = build()
    x_BL = tokens(2, 8)
    with pytest.raises(ValueError, match="targets: shape"):
        model(x_BL, tokens(2, 7))
    with pytest.raises(ValueError, match="targets: id"):
        model(x_BL, torch.full((2, 8), V))
    with pytest.raises(ValueError, match="moe.d_model"):
        MoGETransformer(model_cfg(), moe_cfg(d_model=D * 2))
    cache = model.new_cache(max_len=10)
    model(x_BL, cache=cache)
    with pytest.raises(ValueError, match="after 8 cached positions"):
        model(tokens(2, 3), cache=cache)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_cache_of_another_batch_size_is_a_value_error(batch):
    # Was an AssertionError "checked by the model" (nothing checked it), and under
    # python -O a batch of 1 would have been broadcast into every row of the cache.
    model = build()
    cache = model.new_cache()
    model(tokens(2, 4), cache=cache)
    with pytest.raises(ValueError, match=rf"^tokens: batch of {batch} sequences, but the cache holds 2"):
        model(tokens(batch, 1), cache=cache)
    assert cache.pos == 4


# --- training ----------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient_and_training_reduces_loss():
    moe = moe_cfg(z_loss_coef=0.001)
    model = build(n_layers=3, first_dense_layers=1, qkv_bias=True, moe=moe).train()
    x_BL = tokens(4, 16)
    y_BL = x_BL.roll(-1, dims=1)
    first = model(x_BL, y_BL).loss
    first.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.step()
        opt.zero_grad()
        loss = model(x_BL, y_BL).loss
        loss.backward()
    assert loss.item() < first.item() - 1.0


def _reference_experts(experts):
    """experts' forward as the plain per-expert loop of tests/reference.py."""
    w1, w2 = experts.w_gate_up_EDH, experts.w_down_EFD

    def forward(x_TD, ids_TK, weights_TK, dtype=None):
        dtype = dtype or x_TD.dtype
        return reference_experts(x_TD.to(dtype), ids_TK, weights_TK, w1.to(dtype), w2.to(dtype))

    return forward


def test_bf16_autocast_forward_and_cache():
    model = build()
    moe_layers = [m for m in model.modules() if isinstance(m, MoGELayer)]
    x_BL = tokens(2, 6)
    with torch.no_grad():  # experts big enough that their output is a visible part of the logits
        for layer in moe_layers:
            layer.experts.reset_parameters(0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_BL, x_BL)
        cache = model.new_cache()
        cached = model(x_BL, cache=cache).logits
    assert torch.isfinite(out.loss)
    assert cache.k[0].dtype == torch.bfloat16
    assert_close(cached.float(), out.logits.float())
    for layer in moe_layers:  # from here on the experts are the plain reference loop
        layer.experts.forward = _reference_experts(layer.experts)
    exact = model(x_BL).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x_BL).logits
    # Within twice the bf16 reference's own error of the float32 logits (+0.1% of their scale).
    scale = exact.abs().max().item()
    err_fast = (out.logits.float() - exact).abs().max().item() / scale
    err_ref = (ref.float() - exact).abs().max().item() / scale
    assert err_fast <= 2 * err_ref + 1e-3, (err_fast, err_ref)


def test_generate_skips_the_aux_losses_and_restores_them():
    model = build()
    seen = []
    for layer in model.moe_layers():
        real = layer.route_tokens

        def spy(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            seen.append(float(out.lb_loss.detach()))
            return out

        layer.route_tokens = spy
    model.generate(tokens(2, 4), 3, temperature=0.0)
    assert seen and all(v == 0.0 for v in seen)  # not computed while decoding
    assert all(layer.compute_losses for layer in model.moe_layers())
    seen.clear()
    model(tokens(2, 4))
    assert seen and all(v > 0.0 for v in seen)
